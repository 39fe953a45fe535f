"""Half precision: the pipeline loaded in bf16 (exact, cached and compiled sampling, ParScale streams, the
LiteHybrid, both heads), what stays float32 and why, bf16 autocast in training, and `--mixed-precision` values
that the device cannot run. bf16 runs only at tiny sizes here: bf16 matmuls are slow on CPUs."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale_ear_hf import (
    DiffusionHead,
    EARTrainingModel,
    EARTransformer,
    LiteVAE,
    ParScaleEARPipeline,
    SamplingCache,
    cli,
)
from parscale_ear_hf.evaluation import load_extractor
from parscale_ear_hf.models._checks import check_mixed_precision
from parscale_ear_hf.models.energy_head import energy_score_loss
from parscale_ear_hf.pipeline_parscale_ear import COMPONENTS, mix_guidance

from conftest import ID2LABEL, bfloat16_chain_error, bfloat16_rounding_bound, layers, tiny_components

STEPS, CFG = 4, 3.0
U = torch.finfo(torch.bfloat16).eps / 2  # bf16's unit roundoff, 2^-8
CLASSIFIER = Path(__file__).resolve().parents[1] / "models" / "digit_classifier"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diffusion_head() -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(condition_dim=32, token_channels=4, width=32, depth=2, num_sampling_steps=5)
    with torch.no_grad():  # MAR's init zeros the output (eps = 0 whatever the input): move it off
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny pipelines with P = 2 ParScale streams and the LiteHybrid on, one with EAR's head and one with MAR's,
    saved once (float32) to be loaded in either dtype."""
    root = tmp_path_factory.mktemp("half")
    for head in ("energy", "diffusion"):
        components = tiny_components(parscale_n=2)
        if head == "diffusion":
            components["energy_head"] = diffusion_head()
        ParScaleEARPipeline(**components, id2label=ID2LABEL).save_pretrained(root / head)
    return root


def load(folder, dtype, **kwargs) -> ParScaleEARPipeline:
    pipe = ParScaleEARPipeline.from_pretrained(folder, dtype=dtype, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels=(1, 2, 3), seeds=(10, 11, 12), **kwargs) -> tuple[torch.Tensor, list]:
    """Images `(B, 3, 16, 16)` in [0, 1] as float32, one generator each, and the mask after every step."""
    masks = []

    def keep_mask(pipe, i, step, tensors):
        masks.append(tensors["mask"].clone())
        return {}

    images = pipe(
        list(labels),
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=[gen(s) for s in seeds],
        output_type="pt",
        callback_on_step_end=keep_mask,
        callback_on_step_end_tensor_inputs=["mask"],
        **kwargs,
    ).images
    return images.float(), masks


def rms_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


# ------------------------------------------------------------------------------ the pipeline in bf16


@pytest.mark.parametrize("head", ["energy", "diffusion"])
@pytest.mark.parametrize("cache", [None, SamplingCache(refresh_every=2)], ids=["exact", "cached"])
def test_a_bf16_pipeline_gives_float32s_images_up_to_bf16_rounding(saved, head, cache):
    fp32, bf16 = load(saved / head, torch.float32), load(saved / head, torch.bfloat16)
    assert {getattr(bf16, name).dtype for name in COMPONENTS} == {torch.bfloat16}
    reference, reference_masks = sample(fp32, cache=cache)
    images, masks = sample(bf16, cache=cache)
    # Orders and noise are drawn in float32 from the same generators and the mask schedule is Python
    # arithmetic, so every step reveals the same tokens in both dtypes.
    assert len(masks) == len(reference_masks) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(masks, reference_masks))
    assert images.isfinite().all() and (images - reference).abs().max() > 0  # bf16 did round
    bound = bfloat16_rounding_bound(fp32, STEPS, CFG)
    assert (rms_per_image(images, reference) < bound).all()
    # The bound tells rounding from a wrong computation: other draws are far outside it.
    other, _ = sample(fp32, seeds=(20, 21, 22), cache=cache)
    assert (rms_per_image(other, reference) > 2 * bound).all()


@pytest.mark.slow  # torch.compile builds C++ kernels on a CPU: tens of seconds when its cache is cold
def test_a_compiled_bf16_step_gives_float32s_images_up_to_bf16_rounding(saved):
    fp32, bf16 = load(saved / "energy", torch.float32), load(saved / "energy", torch.bfloat16)
    bf16.enable_compiled_step()
    images, _ = sample(bf16)
    # Fused kernels skip some intermediate roundings of the eager step: still bf16 rounding.
    assert (rms_per_image(images, sample(fp32)[0]) < bfloat16_rounding_bound(fp32, STEPS, CFG)).all()


def test_in_bf16_each_image_comes_from_its_own_generator_alone_or_in_a_batch(saved):
    bf16 = load(saved / "energy", torch.bfloat16)
    batch, _ = sample(bf16)
    alone, _ = sample(bf16, labels=(2,), seeds=(11,))
    # Another batch size sums its products in another order before the bf16 rounding: rounding apart, the same.
    assert rms_per_image(alone, batch[1:2]) < bfloat16_rounding_bound(bf16, STEPS, CFG)


def test_sampling_a_float32_pipeline_under_bf16_autocast_as_eval_does_rounds_as_much(saved):
    """`eval --mixed-precision bf16` samples under autocast: weights are cast where used instead of at load."""
    fp32 = load(saved / "energy", torch.float32)
    reference, _ = sample(fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images, _ = sample(fp32)
    assert images.isfinite().all() and (images - reference).abs().max() > 0
    assert (rms_per_image(images, reference) < bfloat16_rounding_bound(fp32, STEPS, CFG)).all()


def test_a_float32_vae_decodes_a_bf16_generators_tokens(saved):
    """The VAE loaded apart in float32 (`vae=`) decodes the bf16 tokens: cast to its dtype, not the reverse."""
    folder = saved / "energy"
    mixed = load(folder, torch.bfloat16, vae=LiteVAE.from_pretrained(folder, subfolder="vae"))
    assert (mixed.vae.dtype, mixed.transformer.dtype) == (torch.float32, torch.bfloat16)
    fp32 = load(folder, torch.float32)
    images, _ = sample(mixed)
    assert (rms_per_image(images, sample(fp32)[0]) < bfloat16_rounding_bound(fp32, STEPS, CFG)).all()


# ------------------------------------------------------------------------------ what stays float32, and why


def test_parscale_streams_are_mixed_in_float32_and_rounded_once():
    """ParScale takes the aggregation softmax and the weighted sum in float32: the weights sum to one within
    float32 rounding and the mix of bf16 streams is the exact weighted sum rounded once. Weights rounded to
    bf16 would add up to u of every stream's term, much more than u of the sum where the streams cancel."""
    torch.manual_seed(0)
    transformer = EARTransformer(
        in_channels=4, grid_size=4, num_classes=10, hidden_size=32, num_layers=1, num_heads=4, buffer_size=4,
        parscale_n=3, parscale_attn_smooth=0.1,
    ).to(torch.bfloat16)  # fmt: skip
    streams = torch.randn(3, 2, 16, 32, generator=gen(0)).bfloat16()
    weights = transformer.stream_weights(streams)
    assert weights.dtype == torch.float32 and weights.std() > 0.01  # unequal weights
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 16), rtol=0, atol=1e-6)
    terms = weights.permute(2, 0, 1).unsqueeze(-1).double() * streams.double()
    exact, scale = terms.sum(0), terms.abs().sum(0)
    mixed = transformer.aggregate_streams(streams)
    assert mixed.dtype == torch.bfloat16
    assert ((mixed.double() - exact).abs() <= U * exact.abs() + 1e-6 * scale).all()  # float32 sum, one rounding
    in_bf16 = torch.einsum("bnp,pbnd->bnd", weights.bfloat16(), streams)
    assert ((in_bf16.double() - exact).abs() > U * exact.abs() + 1e-6 * scale).any()


def test_guidance_is_mixed_in_float32_and_rounded_once():
    """``cfg * h_c + (1 - cfg) * h_u`` with nearly equal h_c, h_u: the products are ~3x and ~2x the result, so
    bf16 products would carry up to 5x the one rounding of the result that the float32 mix keeps."""
    h_cond = torch.randn(4096, generator=gen(0)).bfloat16()
    h_uncond = (h_cond.double() + 0.05 * torch.randn(4096, generator=gen(1)).double()).bfloat16()
    exact = CFG * h_cond.double() + (1 - CFG) * h_uncond.double()
    mixed = mix_guidance(h_cond, h_uncond, CFG)
    assert mixed.dtype == torch.bfloat16
    assert ((mixed.double() - exact).abs() <= U * exact.abs() * (1 + 1e-6)).all()  # one rounding, no more
    in_bf16 = CFG * h_cond + (1 - CFG) * h_uncond
    assert ((in_bf16.double() - exact).abs() > U * exact.abs()).any()


def test_the_diffusion_heads_chain_stays_float32_in_a_bf16_head():
    """The DDPM chain x_T -> x_0 is float32 in a bf16 head: its tokens carry about one forward's rounding (3 per
    layer). A bf16 chain would round x at each of the 100 steps too: sqrt(100 / 3) u ~ 2.3% from those alone."""
    torch.manual_seed(0)
    head = DiffusionHead(condition_dim=32, token_channels=4, width=32, depth=2, num_sampling_steps=100).eval()
    z = torch.randn(200, 32, generator=gen(0))
    noise = torch.randn(200, *head.noise_shape, generator=gen(1))
    with torch.no_grad():
        reference = head.sample(z, noise=noise)
        tokens = head.to(torch.bfloat16).sample(z.bfloat16(), noise=noise)
    assert tokens.dtype == torch.bfloat16
    error = (tokens.float() - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    assert error < bfloat16_chain_error(3 * len(layers(head))) < bfloat16_chain_error(100)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_the_energy_score_takes_its_norms_in_float32_under_bf16_autocast(target_dtype):
    """Under CPU autocast the head's samples are bf16 and torch would take their norms in bf16: the loss is
    the float32 energy score of those samples, bit for bit."""
    samples = torch.randn(2, 512, 16, generator=gen(0)).bfloat16()
    target = torch.randn(512, 16, generator=gen(1)).to(target_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = energy_score_loss(samples, target)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, energy_score_loss(samples.float(), target.float()))


@pytest.mark.parametrize("head", ["energy", "diffusion"])
def test_bf16_autocast_training_loss_and_gradients_are_float32s_up_to_bf16_rounding(head):
    """accelerate's bf16 on a CPU is ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward. Under
    autocast a layer rounds 4 times in the forward (its float32 input and its weights cast to bf16, its output,
    the elementwise op beside it) and 3 in the backward (its input and weight gradients, the elementwise op's).
    The loss, a mean of values at the end of the forward chain, is within :func:`bfloat16_chain_error` of the
    forward's roundings. A gradient is a product of forward activations and backward signals, whose relative
    errors add: the forward's, plus the backward chain's, which runs through the forward and the backward."""
    components = tiny_components(parscale_n=2)
    for module in components["transformer"].modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the same function in both runs; dropout draws would depend on nothing else
    energy_head = components["energy_head"] if head == "energy" else diffusion_head()
    model = EARTrainingModel(components["lite_hybrid"], components["transformer"], energy_head, score_batch_mul=2)
    latents = torch.randn(32, 4, 4, 4, generator=gen(0))
    labels = torch.arange(32) % 10

    def loss_and_gradient(autocast: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(latents, labels, generator=gen(1))
        loss.backward()
        return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss, gradient = loss_and_gradient(autocast=True)
    reference, reference_gradient = loss_and_gradient(autocast=False)
    assert loss.dtype == torch.float32 and loss.isfinite() and gradient.isfinite().all()
    assert loss != reference  # bf16 did round
    chain = sum(len(layers(m)) for m in (model.lite_hybrid, model.transformer, model.energy_head))
    assert abs(loss - reference) / abs(reference) < bfloat16_chain_error(4 * chain)
    gradient_bound = bfloat16_chain_error(4 * chain) + bfloat16_chain_error(7 * chain)
    assert (gradient - reference_gradient).norm() / reference_gradient.norm() < gradient_bound


def test_features_for_fid_are_float32_inside_an_autocast_region():
    """`eval --mixed-precision bf16` autocasts sampling; the extractor's features stay float32 computations, as
    the reference statistics are."""
    extractor = load_extractor("digit", classifier=CLASSIFIER)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8))
    reference = extractor(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = extractor(images)
    assert torch.equal(features.features, reference.features) and torch.equal(features.logits, reference.logits)


# ------------------------------------------------------------------------------ --mixed-precision, refused early


def test_check_mixed_precision_accepts_what_the_device_runs_and_names_the_rest(monkeypatch):
    for value in ("no", "bf16"):
        check_mixed_precision("train", value, cpu=True)
    with pytest.raises(ValueError, match=r"`--mixed-precision` must be one of \('no', 'bf16'\) on cpu, got 'fp8'\.$"):
        check_mixed_precision("train", "fp8", cpu=True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    check_mixed_precision("train", "no", cpu=False)
    with pytest.raises(ValueError, match=r"one of \('no',\) on cuda \(Tesla V100-SXM2-16GB\), got 'bf16' \(.*\)\.$"):
        check_mixed_precision("train", "bf16", cpu=False)  # emulated bf16 is slower than float32


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--latents", "l", "--model-config", "m.json", "--max-steps", "1"],
        ["train-vae", "--dataset", "d"],
        ["train-dit", "--latents", "l", "--max-steps", "1"],
        ["eval", "--model", "m", "--reference", "r.npz"],
    ],
    ids=lambda argv: argv[0],
)
@pytest.mark.parametrize("value, cpu", [("fp16", True), ("bf16", False)], ids=["fp16-on-cpu", "bf16-on-a-v100"])
def test_a_precision_the_device_cannot_run_is_refused_in_one_line_before_any_work(
    tmp_path, monkeypatch, capsys, command, value, cpu
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not cpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--output-dir", str(out), "--mixed-precision", value, *(["--cpu"] if cpu else [])])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    device = "cpu" if cpu else r"cuda \(Tesla V100-SXM2-16GB\)"
    accepted = r"\('no', 'bf16'\)" if cpu else r"\('no',\)"
    assert "\n" not in err
    assert err.startswith(f"parscale-ear {command[0]}: error: ")
    assert re.search(rf"`--mixed-precision` must be one of {accepted} on {device}, got '{value}' \(", err), err
    assert value != "fp16" or "use bf16, which needs none" in err
    assert not out.exists()


def test_a_left_out_mixed_precision_takes_accelerate_launchs_setting(monkeypatch):
    """`accelerate launch --config_file h100_bf16.yaml train_ear.py` without the flag trains in bf16, not fp32."""
    from parscale_ear_hf.models._checks import check_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert check_mixed_precision("train", None, cpu=True) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch passes its processes
    assert check_mixed_precision("train", None, cpu=True) == "bf16"
    assert check_mixed_precision("train", "no", cpu=True) == "no"  # the flag, when given, wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="`--mixed-precision` must be one of .* got 'fp16'"):
        check_mixed_precision("train", None, cpu=True)

"""MARTransformer and DiffusionHead are MAR (LTH14/mar's `models/mar.py`, `models/diffloss.py`, `diffusion/`).

`tests/fixtures/mar_reference/` holds numbers recorded from the authors' code at a tiny config (4x4 tokens of
4 channels, encoder 24x2, decoder 32x2, head 32x2, 10 classes, weights perturbed from MAR's init), by
`record_fixture.py` beside them. Their weights are mapped into our classes by the converter's own mapping
(:func:`parscale_ear_hf.convert.mar_state_dicts`), and every recorded quantity is reproduced: the backbone's
``z``, the head's output, the training loss (MSE + VLB) with every gradient, and the head's sampler with and
without guidance, and MAR's full ``sample_tokens`` (8 AR steps of 100 diffusion steps, temperature 0.9, cfg 1 and 3,
linear schedule) run by `ParScaleEARPipeline.sample_tokens` with the recorded orders and every Gaussian draw.

Bound: float32 on both sides, the same operations; only the order of some sums differs (BLAS blocking,
our loss summed over the masked rows only, the encoder's boolean gather). A dot product of K terms in another
order differs by about sqrt(K) eps times its O(1) terms (eps = 1.2e-7, K <= 256): ~2e-6 per layer, and the
backbone / head chains are ~10 layers: ATOL = 1e-5, as the EAR fixture. The sampler is a chain of 100 steps
whose first one multiplies the noise prediction by ``1 / sqrt(alpha_t)`` = 316 (t = 999 after 989); with
perturbed, untrained weights the chain grows to ~1e4, so its float32 rounding is relative: the sampler is
checked relative to the largest output, SAMPLER_RTOL = 1e-5 (~80 float32 roundings of it). Measured when the
fixture was recorded: 0 (bit for bit) for z, the head's output, both losses and the z gradient; 1.5e-8 for the
parameter gradients; 2.5e-7 relative (one rounding of a 3.9e4 sample) and 0 for the two sampler cases. Full
sampling chains 8 backbone passes and 8 x 100 sampler steps, each token's chain growing to ~5e4 as the sampler's
does: it is checked with the sampler's relative bound (a token's error is its own chain's float32 rounding,
the backbone's ~1e-6 errors entering relative to O(1) conditions). Measured: 0 (bit for bit) at cfg 1 and 3.
`test_each_check_catches_an_error` shows what a real error does: each perturbation moves its quantity 100x
above its bound or more.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parscale_ear_hf import DiffusionHead, LiteHybrid, LiteVAE, ParScaleEARPipeline
from parscale_ear_hf.convert import mar_components, mar_state_dicts
from parscale_ear_hf.models.diffusion_head import respaced_timesteps
from parscale_ear_hf.models.ear_transformer import latents_to_tokens
from parscale_ear_hf.pipeline_parscale_ear import SamplingCache, mask_schedule, predicting_steps

from conftest import TINY_VAE_CONFIG

FIXTURE = Path(__file__).parent / "fixtures" / "mar_reference"
RECORD = json.loads((FIXTURE / "config.json").read_text())
MAR = RECORD["mar_kwargs"]
CASES = load_file(FIXTURE / "cases.safetensors")
ATOL = 1e-5  # see the module docstring
SAMPLER_RTOL = 1e-5  # relative to the largest sample, see the module docstring


def reference_models():
    weights = load_file(FIXTURE / "reference_weights.safetensors")
    transformer, head = mar_components(
        weights,
        num_heads=MAR["encoder_num_heads"],
        num_sampling_steps=int(MAR["num_sampling_steps"]),
        class_dropout_prob=MAR["label_drop_prob"],
        attn_dropout=MAR["attn_dropout"],
        proj_dropout=MAR["proj_dropout"],
        mask_ratio_min=MAR["mask_ratio_min"],
    )
    return transformer.eval(), head.eval()


def max_error(actual, expected, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    return (actual - expected).abs().max().item()


def assert_matches(actual, expected, what, atol=ATOL):
    err = max_error(actual, expected, what)
    assert err <= atol, f"{what}: max |ours - MAR's| = {err:.3g} > {atol}"


def sampler_error(actual, expected, what):
    return max_error(actual, expected, what) / expected.abs().max().item()


def test_the_fixture_has_the_tiny_config_it_claims():
    transformer, head = reference_models()
    t, h = transformer.config, head.config
    assert (t.grid_size, t.in_channels, t.buffer_size, t.num_classes) == (4, 4, MAR["buffer_size"], 10)
    assert (t.encoder_hidden_size, t.encoder_num_layers, t.decoder_hidden_size, t.decoder_num_layers) == (24, 2, 32, 2)
    assert (h.width, h.depth, h.condition_dim, h.num_sampling_steps) == (32, 2, 32, 100)
    assert transformer.null_class == RECORD["null_class"]


@pytest.mark.parametrize("count", sorted(RECORD["respacings"]))
def test_respacing_keeps_mars_steps(count):
    assert respaced_timesteps(1000, int(count)) == RECORD["respacings"][count]


@pytest.mark.parametrize("case", ["hidden", "hidden_all", "hidden_none"])
def test_backbone_condition(case):
    transformer, _ = reference_models()
    with torch.no_grad():
        z = transformer(CASES[f"{case}.tokens"], CASES[f"{case}.labels"], CASES[f"{case}.mask"])
    assert_matches(z, CASES[f"{case}.out"], f"backbone z ({case})")


def test_head_output():
    _, head = reference_models()
    with torch.no_grad():
        out = head(CASES["head.x_t"], CASES["head.t"], CASES["head.z"])
    assert_matches(out[:, :4], CASES["head.out"][:, :4], "head eps")
    assert_matches(out[:, 4:], CASES["head.out"][:, 4:], "head variance value")


def test_head_loss_and_its_gradient():
    _, head = reference_models()
    mask = CASES["head_loss.mask"]
    z = CASES["head_loss.z"].clone().requires_grad_()
    loss = head.loss(z, CASES["head_loss.target"], num_samples=1, timesteps=CASES["head_loss.t"],
                     noise=CASES["head_loss.noise"], weight=mask.float())  # fmt: skip
    assert_matches(loss, CASES["head_loss.value"], "head loss (MSE + VLB)")
    loss.backward()
    assert_matches(z.grad, CASES["head_loss.z_grad"], "gradient of the head loss in z")


def training_loss(transformer, head):
    """MAR.forward's loss on our side, with the recorded orders, mask ratio, label drop, timesteps and noise."""
    mul, n = MAR["diffusion_batch_mul"], 16
    tokens = latents_to_tokens(CASES["loss.imgs"])
    b = tokens.shape[0]
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask.scatter_(1, CASES["loss.orders"][:, : RECORD["training_loss"]["num_masked"]], True)
    dropped = CASES["loss.drop_u"] < MAR["label_drop_prob"]
    labels = torch.where(dropped, transformer.null_class, CASES["loss.labels"])
    z = transformer(tokens, labels, mask)
    # MAR's rows are (copy, image, position) over every token; ours are the masked ones in that order.
    t = CASES["loss.t"].view(mul, b, n)[:, mask].reshape(-1)
    noise = CASES["loss.noise"].view(mul, b, n, -1)[:, mask].reshape(-1, tokens.shape[-1])
    return head.loss(z[mask], tokens[mask], num_samples=mul, timesteps=t, noise=noise)


def test_training_loss_and_every_gradient():
    transformer, head = reference_models()
    loss = training_loss(transformer.train(), head.train())
    assert_matches(loss, CASES["loss.value"], "training loss")
    loss.backward()
    expected = mar_state_dicts(load_file(FIXTURE / "reference_gradients.safetensors"), transformer, head)
    for name, component in (("transformer", transformer), ("energy_head", head)):
        for key, param in component.named_parameters():
            assert_matches(param.grad, expected[name][key], f"gradient of {name}.{key}")


@pytest.mark.parametrize("case", RECORD["head_sampler_cases"], ids=lambda case: case["name"])
def test_head_sampler(case):
    _, head = reference_models()
    name, z = case["name"], CASES[f"{case['name']}.z"]
    m = CASES[f"{name}.noise"].shape[0]
    z_uncond = z[m:] if case["cfg"] != 1.0 else None
    out = head.sample(z[:m], case["temperature"], noise=CASES[f"{name}.noise"], z_uncond=z_uncond,
                      guidance_scale=case["cfg"])  # fmt: skip
    err = sampler_error(out, CASES[f"{name}.out"], name)
    assert err <= SAMPLER_RTOL, f"head samples ({name}): max |ours - MAR's| / max |MAR's| = {err:.3g}"


def test_each_check_catches_an_error():
    """A real error (a weight off by 1e-3 or 0.05, the timestep off by one, cfg off by 0.01, temperature on x_T too)
    moves each kind of quantity far above its bound."""
    transformer, head = reference_models()
    with torch.no_grad():
        transformer.decoder_pos_embedding[0, 5, 0] += 1e-3  # one entry: a shift of the whole row is normalized away
        z = transformer(CASES["hidden.tokens"], CASES["hidden.labels"], CASES["hidden.mask"])
    assert max_error(z, CASES["hidden.out"], "z") > 100 * ATOL
    _, head = reference_models()
    shifted = CASES["head.t"].clamp(max=998) + 1
    with torch.no_grad():
        assert max_error(head(CASES["head.x_t"], shifted, CASES["head.z"]), CASES["head.out"], "head") > 100 * ATOL
    case = RECORD["head_sampler_cases"][1]
    name, z = case["name"], CASES[f"{case['name']}.z"]
    noise, m = CASES[f"{name}.noise"], CASES[f"{name}.noise"].shape[0]
    off = head.sample(z[:m], case["temperature"], noise=noise, z_uncond=z[m:], guidance_scale=case["cfg"] + 0.01)
    assert sampler_error(off, CASES[f"{name}.out"], "sampler") > 100 * SAMPLER_RTOL
    tempered = noise.clone()
    tempered[:, 0] *= case["temperature"]
    out = head.sample(z[:m], case["temperature"], noise=tempered, z_uncond=z[m:], guidance_scale=case["cfg"])
    assert sampler_error(out, CASES[f"{name}.out"], "sampler") > 100 * SAMPLER_RTOL
    transformer, head = reference_models()
    with torch.no_grad():
        head.blocks[0].modulation[1].bias[5] += 0.05  # the fixture's perturbation scale
    loss = training_loss(transformer.train(), head.train())
    assert max_error(loss, CASES["loss.value"], "loss") > 100 * ATOL
    loss.backward()
    expected = mar_state_dicts(load_file(FIXTURE / "reference_gradients.safetensors"), transformer, head)
    err = max_error(head.out.weight.grad, expected["energy_head"]["out.weight"], "gradient")
    assert err > 100 * ATOL


def mar_pipeline():
    """The fixture's weights in a ParScaleEARPipeline: MAR's backbone and head, the LiteHybrid off (the identity)."""
    transformer, head = reference_models()
    torch.manual_seed(0)
    hybrid = LiteHybrid(in_channels=4, grid_size=4, coarse_grid_size=1, hidden_dim=16, num_heads=2, use_coarse=False,
                        use_fine=False)  # fmt: skip
    pipe = ParScaleEARPipeline(vae=LiteVAE(**TINY_VAE_CONFIG), lite_hybrid=hybrid, transformer=transformer,
                               energy_head=head)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recorded_noise(case, orders):
    """MAR's recorded draws in our layout `(B, N, num_sampling_steps + 1, C)`: ``noise[b, n]`` samples token n of b.

    MAR's AR step predicts ``z[mask_to_pred.nonzero()]``: the step's tokens in raster order per image, image-major
    (the conditional rows first; with guidance the unconditional rows' draws never reach the output). Its
    ``DiffLoss.sample`` draws ``x_T`` for those rows, then one draw per diffusion step; the fixture stores them
    concatenated over AR steps in that row order. Our loop predicts ``orders[:, m_next:m]`` at each step.
    """
    b, n, c = len(case["labels"]), 16, MAR["vae_embed_dim"]
    x_T, steps = CASES[f"{case['name']}.noise_x_T"], CASES[f"{case['name']}.noise_steps"]
    noise = torch.zeros(b, n, steps.shape[1] + 1, c)
    row, masked, counts = 0, n, []
    for step in predicting_steps(case["num_iter"], n):
        masked_next = mask_schedule(step, case["num_iter"], n, masked)
        positions = orders[:, masked_next:masked].sort(dim=1).values  # (B, T), raster order per image
        count = positions.numel()
        counts.append(count)
        draws = torch.cat([x_T[row : row + count, None], steps[row : row + count]], dim=1)
        noise[torch.arange(b)[:, None].expand_as(positions), positions] = draws.view(b, -1, *draws.shape[1:])
        row, masked = row + count, masked_next
    assert counts == case["tokens_per_step"] and row == len(x_T)  # our schedule predicts what MAR's did
    return noise


def sample(pipe, case, noise=None):
    name = case["name"]
    orders = CASES[f"{name}.orders"]
    return pipe.sample_tokens(
        class_ids=CASES[f"{name}.labels"],
        orders=orders,
        noise=recorded_noise(case, orders) if noise is None else noise,
        num_inference_steps=case["num_iter"],
        guidance_scale=case["cfg"],
        guidance_schedule=case["cfg_schedule"],
        temperature=case["temperature"],
    )


@pytest.mark.parametrize("case", RECORD["sampling_cases"], ids=lambda case: case["name"])
def test_full_sampling(case):
    """MAR's ``sample_tokens`` end to end: 8 AR steps, a 100-step diffusion chain per token (SAMPLER_RTOL)."""
    tokens = sample(mar_pipeline(), case)
    err = sampler_error(tokens, CASES[f"{case['name']}.tokens"], case["name"])
    assert err <= SAMPLER_RTOL, f"sampled tokens ({case['name']}): max |ours - MAR's| / max |MAR's| = {err:.3g}"


def test_full_sampling_catches_guidance_in_the_wrong_place(monkeypatch):
    """Guidance mixed on z before the head (as EAR's), not on eps at every diffusion step, moves the cfg-3 tokens
    far beyond the bound; so does the MAR noise of one AR step given to the wrong tokens."""
    case = RECORD["sampling_cases"][1]
    pipe = mar_pipeline()
    expected = CASES[f"{case['name']}.tokens"]
    monkeypatch.setattr(type(pipe.energy_head), "guidance_in_head", False)
    off = sample(pipe, case)
    assert sampler_error(off, expected, "z mixed") > 100 * SAMPLER_RTOL
    monkeypatch.undo()
    noise = recorded_noise(case, CASES[f"{case['name']}.orders"])
    assert sampler_error(sample(pipe, case, noise.flip(0)), expected, "noise of other images") > 100 * SAMPLER_RTOL


def test_the_pipeline_names_what_does_not_fit_mars_backbone():
    transformer, _ = reference_models()
    pipe = mar_pipeline()
    parts = dict(vae=pipe.vae, lite_hybrid=pipe.lite_hybrid, transformer=transformer)
    width = r"energy_head.config.condition_dim=24 but transformer.config.decoder_hidden_size=32 \(MARTransformer\)"
    with pytest.raises(ValueError, match=width):
        ParScaleEARPipeline(**parts, energy_head=DiffusionHead(condition_dim=24, token_channels=4, width=8, depth=1))
    with pytest.raises(ValueError, match=r"energy_head.config.token_channels=8 but transformer.config.in_channels=4"):
        ParScaleEARPipeline(**parts, energy_head=DiffusionHead(condition_dim=32, token_channels=8, width=8, depth=1))
    with pytest.raises(ValueError, match="full_layers` is 2 .* MARTransformer works on stacks of 2 blocks"):
        pipe([1], num_inference_steps=2, cache=SamplingCache(full_layers=2))

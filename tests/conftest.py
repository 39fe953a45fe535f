"""Tiny components shared by the tests: every test runs on 2 CPU cores in seconds."""

import hashlib
import math
import runpy
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from parscale_ear_hf import EARTransformer, EnergyHead, LiteHybrid, LiteVAE, ParScaleEARPipeline

torch.set_num_threads(2)

NUM_CLASSES = 10
ID2LABEL = {i: f"digit {i}, number {i}" for i in range(NUM_CLASSES)}
# A LiteVAE for 16x16 RGB images with a 4x4x4 latent.
TINY_VAE_CONFIG = dict(
    sample_size=16,
    levels=2,
    latent_channels=4,
    encoder_channels=(8, 8),
    encoder_layers_per_level=1,
    aggregation_channels=16,
    aggregation_layers=1,
    decoder_block_out_channels=(8, 16, 16),
    decoder_layers_per_block=1,
    norm_num_groups=4,
)


def tiny_components(parscale_n: int = 1, seed: int = 0, **hybrid_kwargs):
    """A 16x16 RGB VAE with a 4x4x4 token grid, and matching generator parts."""
    torch.manual_seed(seed)
    vae = LiteVAE(**TINY_VAE_CONFIG)
    lite_hybrid = LiteHybrid(
        in_channels=4, grid_size=4, coarse_grid_size=2, hidden_dim=16, num_heads=2, **hybrid_kwargs
    )
    transformer = EARTransformer(
        in_channels=4,
        grid_size=4,
        num_classes=NUM_CLASSES,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        buffer_size=4,
        parscale_n=parscale_n,
    )
    energy_head = EnergyHead(condition_dim=32, token_channels=4, width=32, depth=2, noise_dim=8)
    # Non-zero gates, so that the LiteHybrid actually changes the tokens in the tests.
    with torch.no_grad():
        for name, param in lite_hybrid.named_parameters():
            if name.endswith("_gate"):
                param.normal_(std=0.5)
        # EAR's head starts at exactly 0 (zero AdaLN modulations and output layer): give those layers
        # PyTorch's default init, so that sampled tokens depend on z, the noise and the temperature.
        for module in energy_head.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.reset_parameters()
    return {"vae": vae, "lite_hybrid": lite_hybrid, "transformer": transformer, "energy_head": energy_head}


def tiny_pipeline(parscale_n: int = 1, seed: int = 0) -> ParScaleEARPipeline:
    pipe = ParScaleEARPipeline(**tiny_components(parscale_n, seed), id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture
def components():
    return tiny_components()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes one mixed precision per process (AcceleratorState): a test that trains in-process with
    another one starts and ends with none fixed, as accelerate's own tests do."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def float32_rounding_bound(pipe: ParScaleEARPipeline, num_inference_steps: int) -> float:
    """How far two runs of the same images may differ when float32 sums are taken in another order.

    BLAS picks its blocking, hence the order of each dot product's sum, by matrix shape (batch
    size) and CPU kind. Two orders of a sum of K terms differ by at most 2 K u = K eps times the
    sum of |terms| (Higham's bound, unit roundoff u = eps / 2); the activations here are O(1). An
    image value is the end of a chain of such sums: every Linear / Conv2d of the generator parts
    once per sampling step, then each of the VAE (its encoder too: a slight over-count). To first
    order those perturbations add, so we bound by (layers in the chain) x (largest fan-in K) x eps.
    For the tiny pipeline that is about 2.5e-3 (~150 layers, K = 144 of a 3x3 conv over 16
    channels): below one 8-bit level (1/255), and far below what a real bug does (another seed,
    label or image changes values by ~0.6). With ``num_inference_steps=0``: decoding alone.
    """
    eps = torch.finfo(torch.float32).eps

    def fan_in(layer):
        if isinstance(layer, torch.nn.Linear):
            return layer.in_features
        return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]

    per_step = layers(pipe.lite_hybrid) + layers(pipe.transformer) + layers(pipe.energy_head)
    chain = num_inference_steps * len(per_step) + len(layers(pipe.vae))
    return chain * max(map(fan_in, per_step + layers(pipe.vae))) * eps


def layers(module: torch.nn.Module) -> list:
    """The Linear and Conv2d layers of `module`: the sums of products that a chain of roundings counts."""
    return [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def bfloat16_chain_error(num_roundings: float) -> float:
    """Root-mean-square relative error of O(1) values at the end of a chain of `num_roundings` bf16 roundings.

    bf16 keeps 8 significant bits: a rounding is a relative error below its unit roundoff u = 2^-8 (3.9e-3).
    bf16 matrix products and convolutions sum in float32 (CPU and GPU kernels), so a layer rounds its output
    once, not once per term. To first order the errors of a chain add up. Their worst case, n u for n roundings,
    passes 1 after a few hundred and says nothing; but rounding to nearest is unbiased and its errors are
    nearly independent, each uniform on [-u, u] (variance u^2 / 3), so n of them have a root mean square of
    sqrt(n / 3) u (Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
    Comput. 2019: errors grow as sqrt(n) u, not n u). A wrong computation is off by O(1), not by this.
    """
    return math.sqrt(num_roundings / 3) * torch.finfo(torch.bfloat16).eps / 2


def bfloat16_rounding_bound(pipe: ParScaleEARPipeline, num_inference_steps: int, guidance_scale: float = 1.0) -> float:
    """How far, in root mean square over an image's values, a bf16 pipeline's image may be from float32's.

    The same generators give both runs the same draws and orders, so they differ by rounding alone:
    :func:`bfloat16_chain_error` of the roundings on the chain to an image value. A Linear or Conv2d layer of a
    bf16 pipeline rounds 3 times: its weights (once, at load), its output and the elementwise op beside it
    (normalisation, activation, modulation or residual add). Per sampling step the chain holds the LiteHybrid and
    the backbone, whose errors guidance multiplies by cfg (conditional pass) and 1 - cfg (unconditional), a gain
    cfg^2 + (cfg - 1)^2 on their variance; then the head, once per token (EnergyHead) or `num_sampling_steps`
    times (DiffusionHead). Then the VAE's decoder. An image in [0, 1] is half the decoder's [-1, 1]: half the
    error. The tiny pipeline at 4 steps and cfg 3 gives about 0.06: ten times what bf16 changes here (~0.006),
    a third of what another seed does (~0.2).
    """
    cfg = guidance_scale
    backbone = len(layers(pipe.lite_hybrid)) + len(layers(pipe.transformer))
    head = len(layers(pipe.energy_head)) * getattr(pipe.energy_head.config, "num_sampling_steps", 1)
    chain = num_inference_steps * ((cfg**2 + (cfg - 1) ** 2) * backbone + head) + len(layers(pipe.vae.decoder))
    return bfloat16_chain_error(3 * chain) / 2


def flip_middle_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a file (of a weights file: inside the tensors, past the header)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def tree_hashes(folder) -> dict:
    """``{relative path: sha256}`` of every file (symlinks followed), so added or removed files show too."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def frechet_by_eigh(a, b) -> float:
    """The Frechet distance of two feature sets (rows), written out here: float64 statistics, then
    Tr((s1^1/2 s2 s1^1/2)^1/2) through symmetric eigendecompositions."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(root1 @ s2 @ root1)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def torch_fidelity_state_dict(model) -> dict:
    """Our weights in torch-fidelity's layout (its module names, BatchNorm2d keys with gamma = 1) plus
    a random 2048 -> 1008 classifier, as torch-fidelity's .pth holds one."""
    ours, state_dict = model.state_dict(), {}
    for name, theirs in model.torch_fidelity_names().items():
        state_dict[f"{theirs}.conv.weight"] = ours[f"{name}.weight"]
        state_dict[f"{theirs}.bn.weight"] = torch.ones_like(ours[f"{name}.beta"])
        state_dict[f"{theirs}.bn.bias"] = ours[f"{name}.beta"]
        state_dict[f"{theirs}.bn.running_mean"] = ours[f"{name}.mean"]
        state_dict[f"{theirs}.bn.running_var"] = ours[f"{name}.var"]
    generator = torch.Generator().manual_seed(0)
    state_dict["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.01
    state_dict["fc.bias"] = torch.randn(1008, generator=generator)
    return state_dict


def make_latent_workspace(root, count: int, names=None, scale: float = 1.5, shift: float = 0.1) -> None:
    """In `root`: a tiny VAE (`vae/`), `count` random 16x16 RGB images with labels ``i % 10`` (`data/`, a
    save_to_disk folder), their latent cache (`latents/`, 4x4x4) and a small DigitClassifier (`clf/`) whose
    untrained features are spread out, so that the metrics computed with it are far from 0."""
    import datasets
    import numpy as np
    import PIL.Image

    from parscale_ear_hf.digit_classifier import DigitClassifier
    from parscale_ear_hf.training.latent_cache import encode_to_cache, write_cache_info

    names = names or [str(i) for i in range(10)]
    torch.manual_seed(0)
    LiteVAE(**TINY_VAE_CONFIG).eval().save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(count)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(count)]}, features=features)
    data.save_to_disk(root / "data")
    encode_to_cache(LiteVAE.from_pretrained(root / "vae"), data, root / "latents", image_size=16, channels=3)
    write_cache_info(root / "latents", 1, vae=str(root / "vae"), scaling_factor=scale, shift_factor=shift,
                     hflip=False, dataset="synthetic", split="train", image_size=16)  # fmt: skip
    classifier = DigitClassifier(in_channels=3, image_size=16, width=4, feature_dim=6, dropout=0.0)
    with torch.no_grad():
        classifier.to_features.weight.mul_(30)
    classifier.save_pretrained(root / "clf")


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *argv: str) -> None:
    """`python examples/<script> <argv>`, run in this process (its ``__main__`` block), so tests can patch it."""
    path = EXAMPLES / script
    with mock.patch.object(sys, "argv", [str(path), *argv]):
        runpy.run_path(str(path), run_name="__main__")

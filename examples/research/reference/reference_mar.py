"""The authors' MAR (LTH14/mar at fe470ac), loaded from a checkout, beside ours with the same weights.

The sampling benchmark (``python examples/benchmark.py --sections mar_reference --mar-reference-code DIR``)
times the authors' ``MAR.sample_tokens`` against our pipeline (MAR's backbone and diffusion head, the
LiteHybrid off) at one random-weight config. Their code is never part of this repository: it is imported
from a checkout or an extracted archive given at run time, a folder with `models/mar.py`,
`models/diffloss.py` and `diffusion/`:

    git clone https://github.com/LTH14/mar mar_ref && git -C mar_ref checkout fe470ac
    pip install --no-deps timm==1.0.31       # MAR's backbone blocks; scipy is needed too

The shims are EAR's (:mod:`research.reference.reference_ear`): a torchvision stub while timm and their
files are imported (where torchvision cannot be imported), and ``Tensor.cuda`` moving to the sampling
device only while their sampler runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import partial
from pathlib import Path

import torch

from research.reference.reference_ear import (
    TIMM_INSTALL,
    ReferenceUnavailable,
    cuda_calls_go_to,
    import_from_checkout,
)

MAR_COMMIT = "fe470ac"
MAR_FILES = ("models/mar.py", "models/diffloss.py", "diffusion/__init__.py")
# Random weights, small enough for a shared 2-core CPU: 8x8 tokens of MAR's 16 channels, encoder and decoder 4
# blocks of width 256 (MAR-B: 12 + 12 of 768), buffer 16 (MAR: 64), head 3 blocks of width 256 (MAR-B: 1024), 25
# diffusion steps (MAR: 100; one 16-step sample at 16x16 tokens and 100 took a minute a call there).
MAR_CONFIG = dict(
    grid_size=8, in_channels=16, num_classes=1000, hidden_size=256, num_layers=4, num_heads=4, buffer_size=16,
    head_width=256, head_depth=3, num_sampling_steps=25,
)  # fmt: skip


def describe(config: dict) -> str:
    """The config in words, for the table's first line."""
    c = config
    return (f"{c['grid_size']}x{c['grid_size']}x{c['in_channels']} tokens, encoder and decoder {c['num_layers']} + "
            f"{c['num_layers']} blocks of width {c['hidden_size']}, buffer {c['buffer_size']}, {c['num_classes']} "
            f"classes, head {c['head_depth']} blocks of width {c['head_width']}, {c['num_sampling_steps']} diffusion "
            "steps")  # fmt: skip


def check_reference_code(path: str | Path | None) -> Path:
    """The folder, checked to hold MAR's files.

    Raises:
        ReferenceUnavailable: `path` is None, or the folder lacks one of :data:`MAR_FILES` (named).
    """
    if path is None:
        raise ReferenceUnavailable(
            "no checkout of the authors' MAR was given (--mar-reference-code DIR or $MAR_REFERENCE_CODE: LTH14/mar "
            f"at {MAR_COMMIT}, outside this repository)"
        )
    folder = Path(path)
    missing = [name for name in MAR_FILES if not (folder / name).is_file()]
    if missing:
        raise ReferenceUnavailable(
            f"{str(folder)!r} is not a checkout of the authors' MAR: it lacks {', '.join(missing)} (expected "
            f"LTH14/mar at {MAR_COMMIT}, e.g. `git clone https://github.com/LTH14/mar DIR && git -C DIR checkout "
            f"{MAR_COMMIT}`)"
        )
    return folder


def import_reference(path: str | Path | None):
    """The authors' `models/mar.py` as a module (its `MAR` class; `models.diffloss` and `diffusion` with it).

    Raises:
        ReferenceUnavailable: the checkout is missing (:func:`check_reference_code`), or timm or scipy is not
            installed.
    """
    folder = check_reference_code(path)
    for package, install in (("timm", TIMM_INSTALL), ("scipy", "pip install scipy")):
        if importlib.util.find_spec(package) is None:
            raise ReferenceUnavailable(f"the authors' MAR imports {package}, which is not installed: `{install}`")
    return import_from_checkout(folder, "models.mar", ("models", "diffusion"))


def mar_kwargs(config: dict) -> dict:
    """`MAR(...)`'s arguments for a config in our names (:data:`MAR_CONFIG`); dropout off, MAR's other defaults."""
    return dict(
        img_size=config["grid_size"] * 16,  # vae_stride 16, patch_size 1: one token per 16x16 pixels
        vae_stride=16,
        patch_size=1,
        encoder_embed_dim=config["hidden_size"],
        encoder_depth=config["num_layers"],
        encoder_num_heads=config["num_heads"],
        decoder_embed_dim=config["hidden_size"],
        decoder_depth=config["num_layers"],
        decoder_num_heads=config["num_heads"],
        mlp_ratio=4.0,
        vae_embed_dim=config["in_channels"],
        class_num=config["num_classes"],
        attn_dropout=0.0,
        proj_dropout=0.0,
        buffer_size=config["buffer_size"],
        diffloss_d=config["head_depth"],
        diffloss_w=config["head_width"],
        num_sampling_steps=str(config["num_sampling_steps"]),
    )


def build_reference(path: str | Path | None, config: dict, seed: int = 0, perturb: float = 0.05) -> torch.nn.Module:
    """The authors' ``MAR`` at `config`, in eval mode, its weights MAR's init moved by ``perturb * N(0, 1)`` (as the
    fixture's, so that the head's zero-initialised modulations and output hide nothing). LayerNorm eps 1e-6, as
    `mar_base` / `mar_large` / `mar_huge`."""
    module = import_reference(path)
    torch.manual_seed(seed)
    model = module.MAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **mar_kwargs(config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(perturb * torch.randn_like(param))
    return model.eval()


def our_pipeline(reference: torch.nn.Module, config: dict):
    """A :class:`ParScaleEARPipeline` with the reference's weights (the converter's MAR mapping), LiteHybrid off.

    The VAE is a small random LiteVAE of the right latent shape: ``output_type="latent"`` never uses it."""
    from parscale_ear_hf.convert import mar_components
    from parscale_ear_hf.models import LiteHybrid, LiteVAE
    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline

    weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    transformer, head = mar_components(
        weights, num_heads=config["num_heads"], num_sampling_steps=config["num_sampling_steps"], attn_dropout=0.0,
        proj_dropout=0.0,
    )  # fmt: skip
    channels, grid = config["in_channels"], config["grid_size"]
    vae = LiteVAE(
        sample_size=grid * 4, levels=2, latent_channels=channels, encoder_channels=(8, 8), aggregation_channels=16,
        aggregation_layers=1, decoder_block_out_channels=(8, 16, 16), decoder_layers_per_block=1, norm_num_groups=4,
    )  # fmt: skip
    hybrid = LiteHybrid(in_channels=channels, grid_size=grid, coarse_grid_size=1, use_coarse=False, use_fine=False)
    pipe = ParScaleEARPipeline(vae=vae, lite_hybrid=hybrid, transformer=transformer.eval(), energy_head=head.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(next(reference.parameters()).device)


@torch.no_grad()
def reference_sample(reference, labels: torch.Tensor, num_iter: int, cfg: float, temperature: float):
    """The authors' ``MAR.sample_tokens`` as their `engine_mar.py` calls it (linear guidance schedule): latents
    `(B, C, h, w)`, their own random orders (numpy) and Gaussian draws (torch)."""
    with cuda_calls_go_to(labels.device):
        return reference.sample_tokens(len(labels), num_iter=num_iter, cfg=cfg, cfg_schedule="linear", labels=labels,
                                       temperature=temperature)  # fmt: skip


class _GaussianLog:
    """``torch.randn`` / ``torch.randn_like`` while their sampler runs: drawn from a seeded generator, each kept."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []
        self.real_randn = torch.randn

    def randn(self, *shape, device=None, dtype=None, **kwargs):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        out = self.real_randn(*shape, generator=self.generator).to(device=device, dtype=dtype)
        self.draws.append(out.cpu())
        return out

    def randn_like(self, x, **kwargs):
        return self.randn(x.shape, device=x.device, dtype=x.dtype)


@contextlib.contextmanager
def _patched(owner, name, value):
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


@torch.no_grad()
def reference_sample_logged(
    reference, labels: torch.Tensor, orders: torch.Tensor, num_iter: int, cfg: float, temperature: float, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The authors' ``MAR.sample_tokens`` with given orders, every Gaussian draw taken from a seeded generator
    and recorded in the order it is consumed (as tests/fixtures/mar_reference/record_fixture.py does).

    Returns:
        ``(tokens, draws)``: tokens `(B, N, C)` in raster order; per AR step, the head's ``x_T`` `(M, C)` for its
        M predicted tokens, then one draw per diffusion step (`(2M, C)` with guidance: the conditional rows first).
    """
    log = _GaussianLog(seed)
    with (
        _patched(reference, "sample_orders", lambda bsz: orders),
        _patched(torch, "randn", log.randn),
        _patched(torch, "randn_like", log.randn_like),
    ):
        latents = reference_sample(reference, labels, num_iter, cfg, temperature)
    return reference.patchify(latents), log.draws


def noise_in_our_layout(draws: list[torch.Tensor], orders: torch.Tensor, num_iter: int, steps: int) -> torch.Tensor:
    """MAR's draws (:func:`reference_sample_logged`) as ``pipe.sample_tokens``' noise `(B, N, steps + 1, C)`:
    ``noise[b, n]`` samples token n of image b.

    MAR's AR step predicts the step's tokens in raster order per image, image-major, and its head draws ``x_T``
    for them, then one draw per diffusion step (the unconditional rows' draws never reach the output). Our
    loop predicts ``orders[:, masked_next:masked]`` at each step, by the same cosine schedule.

    Raises:
        RuntimeError: the draws do not match our schedule (another count of tokens or of draws).
    """
    from parscale_ear_hf.pipeline_parscale_ear import mask_schedule, predicting_steps

    b, n = orders.shape
    noise = torch.zeros(b, n, steps + 1, draws[0].shape[-1])
    at, masked = 0, n
    for step in predicting_steps(num_iter, n):
        masked_next = mask_schedule(step, num_iter, n, masked)
        positions = orders[:, masked_next:masked].sort(dim=1).values.cpu()  # (B, T), raster order per image
        count = positions.numel()
        chain = draws[at : at + steps + 1]
        if len(chain) != steps + 1 or chain[0].shape[0] != count:
            raise RuntimeError(
                f"reference replay: MAR's AR step drew {chain[0].shape[0] if chain else 0} x_T rows, our schedule "
                f"predicts {count} tokens at step {step}"
            )
        rows = torch.stack([chain[0]] + [d[:count] for d in chain[1:]], dim=1)  # (count, steps + 1, C)
        noise[torch.arange(b)[:, None].expand_as(positions), positions] = rows.view(b, -1, *rows.shape[1:])
        at, masked = at + steps + 1, masked_next
    if at != len(draws):
        raise RuntimeError(f"reference replay: MAR drew {len(draws)} times, our schedule accounts for {at}")
    return noise

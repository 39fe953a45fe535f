"""The authors' EAR (shaochenze/EAR at 9256a9f), loaded from a checkout, beside ours with the same weights.

The sampling benchmark (``python examples/benchmark.py --sections reference --reference-code DIR``)
times the authors' ``EAR.sample_tokens`` against our pipeline at one config and one set of weights.
Their code is never part of this repository: it is imported from a checkout given at run time,
a folder that has `models/ear.py` and `models/scoreloss.py`:

    git clone https://github.com/shaochenze/EAR ear_ref && git -C ear_ref checkout 9256a9f
    pip install --no-deps timm==1.0.31       # their backbone blocks; not a dependency of this package

Two shims make their CUDA-only code run on a CPU, each as narrow as it can be:

- timm imports torchvision (for its data transforms and a frozen batch norm that EAR does not use),
  and PyPI's torchvision does not import beside every torch build. When torchvision cannot be
  imported, a stub stands in for it while `timm` and their files are imported, and is removed
  afterwards (timm keeps the stub objects it took, nothing else sees them).
- Their sampler moves tensors with ``.cuda()``. While one of their functions runs on a device other
  than CUDA (and only then), ``Tensor.cuda`` moves to that device instead; it is restored afterwards.

:func:`build_reference` makes an ``EAR`` at a given config with perturbed weights (their init zeroes
the head's modulations and output layer, so a fresh head outputs 0), and :func:`our_pipeline` puts the
same weights into an :class:`EARTransformer` and :class:`EnergyHead` through the converter
(:mod:`parscale_ear_hf.convert`), with the LiteHybrid off: EAR's math exactly.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from functools import partial
from pathlib import Path

import torch

EAR_COMMIT = "9256a9f"
REFERENCE_FILES = ("models/ear.py", "models/scoreloss.py")
TIMM_INSTALL = "pip install --no-deps timm==1.0.31"

# Configs in our names; :func:`ear_kwargs` maps them to `EAR(...)`'s arguments.
DEMO_CONFIG = dict(  # the shape of models/mnist_demo (8x8x4 tokens)
    grid_size=8, in_channels=4, num_classes=10, hidden_size=256, num_layers=6, num_heads=8, buffer_size=8,
    head_width=128, head_depth=3, noise_dim=32,
)  # fmt: skip
# ImageNet-256's 16x16 token grid with a small backbone: one guided 64-step batch of 16 is ~5 TFLOP, under a
# minute on 2 CPU cores (at ~170 GFLOP/s).
MID_CONFIG = dict(
    grid_size=16, in_channels=16, num_classes=1000, hidden_size=256, num_layers=6, num_heads=4, buffer_size=16,
    head_width=256, head_depth=3, noise_dim=64,
)  # fmt: skip


class ReferenceUnavailable(RuntimeError):
    """The authors' code cannot be loaded here: the checkout or timm is missing (the message says which and how)."""


def check_reference_code(path: str | Path | None) -> Path:
    """The checkout folder, checked to hold the authors' two files.

    Raises:
        ReferenceUnavailable: `path` is None, not a folder, or lacks `models/ear.py` / `models/scoreloss.py`.
    """
    if path is None:
        raise ReferenceUnavailable(
            "no checkout of the authors' EAR was given (--reference-code DIR: a clone of shaochenze/EAR at "
            f"{EAR_COMMIT}, outside this repository)"
        )
    folder = Path(path)
    missing = [name for name in REFERENCE_FILES if not (folder / name).is_file()]
    if missing:
        raise ReferenceUnavailable(
            f"{str(folder)!r} is not a checkout of the authors' EAR: it lacks {', '.join(missing)} (expected a clone "
            f"of shaochenze/EAR at {EAR_COMMIT}, e.g. `git clone https://github.com/shaochenze/EAR DIR && git -C DIR "
            f"checkout {EAR_COMMIT}`)"
        )
    return folder


class _StubMeta(type):
    """Any attribute of a stub is another stub class (usable as a value, a dict key or a base class)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (), {})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _torchvision_imports() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a build for another torch fails in many ways (RuntimeError, OSError, ImportError)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


@contextlib.contextmanager
def _torchvision_stub_if_needed():
    """A torchvision stub on the import path while the block runs, only when the real one cannot be imported."""
    if "timm" in sys.modules or _torchvision_imports():
        yield
        return
    stub = _TorchvisionStub()
    sys.meta_path.insert(0, stub)
    try:
        yield
    finally:
        sys.meta_path.remove(stub)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


def import_reference(path: str | Path | None) -> types.ModuleType:
    """The authors' `models/ear.py` as a module (its `EAR` class; `models.scoreloss` imported with it).

    Their files import each other as the top-level package `models`; that name is on ``sys.modules``
    only while they are imported, so it cannot shadow or be shadowed by another `models` package.

    Raises:
        ReferenceUnavailable: the checkout is missing (:func:`check_reference_code`) or timm is not installed.
    """
    folder = check_reference_code(path)
    if importlib.util.find_spec("timm") is None:
        raise ReferenceUnavailable(
            f"the authors' EAR builds its backbone from timm's ViT blocks, and timm is not installed: "
            f"`{TIMM_INSTALL}` (no other dependency is needed; it is not a dependency of this package)"
        )
    return import_from_checkout(folder, "models.ear", ("models",))


def import_from_checkout(folder: Path, module_name: str, packages: tuple[str, ...]) -> types.ModuleType:
    """`module_name` imported from a checkout whose files import each other as the top-level `packages`
    (``models``, ``diffusion``): those names are on ``sys.modules`` only while it is imported, so they
    neither shadow nor are shadowed by other packages of those names. timm is imported first, with the
    torchvision stub where torchvision cannot be imported."""

    def ours(name: str) -> bool:
        return name.split(".")[0] in packages

    taken = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
    sys.path.insert(0, str(folder.resolve()))
    try:
        with _torchvision_stub_if_needed():
            import timm  # noqa: F401

            module = importlib.import_module(module_name)
    finally:
        sys.path.remove(str(folder.resolve()))
        for name in [m for m in sys.modules if ours(m)]:
            del sys.modules[name]
        sys.modules.update(taken)
    return module


@contextlib.contextmanager
def cuda_calls_go_to(device: torch.device | str):
    """While the block runs, ``Tensor.cuda()`` moves to `device` (no change when `device` is CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        yield
        return
    real = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = real


def ear_kwargs(config: dict) -> dict:
    """`EAR(...)`'s arguments for a config in our names (:data:`DEMO_CONFIG`); dropout off."""
    return dict(
        img_size=config["grid_size"] * 16,  # vae_stride 16, patch_size 1: one token per 16x16 pixels
        vae_stride=16,
        patch_size=1,
        decoder_embed_dim=config["hidden_size"],
        decoder_depth=config["num_layers"],
        decoder_num_heads=config["num_heads"],
        mlp_ratio=4.0,
        vae_embed_dim=config["in_channels"],
        class_num=config["num_classes"],
        attn_dropout=0.0,
        proj_dropout=0.0,
        buffer_size=config["buffer_size"],
        scoreloss_d=config["head_depth"],
        scoreloss_w=config["head_width"],
        noise_channels=config["noise_dim"],
    )


def build_reference(path: str | Path | None, config: dict, seed: int = 0, perturb: float = 0.1) -> torch.nn.Module:
    """The authors' ``EAR`` at `config` (our names, see :func:`ear_kwargs`), in eval mode, its weights
    perturbed by ``perturb * N(0, 1)`` so that no layer is zero (their head starts at exactly 0).
    LayerNorm eps 1e-6, as `ear_base` / `ear_large` / `ear_huge`."""
    module = import_reference(path)
    torch.manual_seed(seed)
    model = module.EAR(norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **ear_kwargs(config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(perturb * torch.randn_like(param))
    return model.eval()


def our_pipeline(reference: torch.nn.Module, config: dict):
    """A :class:`ParScaleEARPipeline` with the reference's weights (converter's mapping), LiteHybrid off.

    The VAE is a small random LiteVAE of the right latent shape: it only decodes, and
    ``output_type="latent"`` (what is compared) never uses it."""
    from parscale_ear_hf.convert import ear_components
    from parscale_ear_hf.models import LiteHybrid, LiteVAE
    from parscale_ear_hf.pipeline_parscale_ear import ParScaleEARPipeline

    weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    transformer, energy_head = ear_components(
        weights, num_heads=config["num_heads"], buffer_size=config["buffer_size"], dropout=0.0
    )
    channels, grid = config["in_channels"], config["grid_size"]
    vae = LiteVAE(
        sample_size=grid * 4, levels=2, latent_channels=channels, encoder_channels=(8, 8), aggregation_channels=16,
        aggregation_layers=1, decoder_block_out_channels=(8, 16, 16), decoder_layers_per_block=1, norm_num_groups=4,
    )  # fmt: skip
    lite_hybrid = LiteHybrid(
        in_channels=channels, grid_size=grid, coarse_grid_size=1, use_coarse=False, use_fine=False
    )
    pipe = ParScaleEARPipeline(vae=vae, lite_hybrid=lite_hybrid, transformer=transformer, energy_head=energy_head)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(next(reference.parameters()).device)


@torch.no_grad()
def reference_sample(reference, labels: torch.Tensor, num_iter: int, cfg: float, temperature: float):
    """The authors' ``EAR.sample_tokens`` as their `engine_ear.py` calls it (linear guidance schedule):
    latents `(B, C, h, w)`, their own random orders (numpy) and head noise (torch)."""
    with cuda_calls_go_to(labels.device):
        return reference.sample_tokens(
            len(labels), num_iter=num_iter, cfg=cfg, cfg_schedule="linear", labels=labels,
            infer_temperature=temperature,
        )  # fmt: skip


class _TorchWithNoise:
    """Stands in for `torch` inside the authors' `models/scoreloss.py` during one ``ScoreLoss.sample``:
    its ``torch.rand`` returns the given values, everything else is torch's."""

    def __init__(self, values: torch.Tensor):
        self._values = values

    def rand(self, size, dtype=None, device=None):
        if tuple(size) != tuple(self._values.shape):
            raise RuntimeError(
                f"reference replay: ScoreLoss drew noise {tuple(size)}, expected {tuple(self._values.shape)}"
            )
        return self._values.to(device=device, dtype=dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


@torch.no_grad()
def reference_sample_tokens(
    reference, labels: torch.Tensor, orders: torch.Tensor, noise: torch.Tensor, num_iter: int, cfg: float,
    temperature: float,
) -> torch.Tensor:  # fmt: skip
    """The authors' ``EAR.sample_tokens`` with given orders and head noise, as our ``pipe.sample_tokens`` takes them.

    Their sampler draws orders with `sample_orders` (numpy) and noise inside ``ScoreLoss.sample``
    (``torch.rand(rows, noise) - 0.5``, one row per token predicted at that step). Both are replaced
    on this instance only, for this call: `sample_orders` returns `orders`, and each row of noise is
    ``noise[b, n] + 0.5`` for the (image, position) of that row, read from their sampler's own
    `mask_to_pred` (cond rows first, row-major), so the head sees exactly ``noise[b, n]``.

    Args:
        labels: `(B,)`; orders: `(B, N)`; noise: `(B, N, noise_dim)` in the head's space U[-0.5, 0.5).

    Returns:
        Tokens `(B, N, C)` in raster order, as ``pipe.sample_tokens`` returns them.
    """
    bsz = len(labels)
    scoreloss = reference.scoreloss
    real_sample = scoreloss.sample
    scoreloss_globals = real_sample.__func__.__globals__

    def sample(z, infer_temperature=1.0, cfg=1.0):
        caller = sys._getframe(1)
        if caller.f_code.co_name != "sample_tokens" or "mask_to_pred" not in caller.f_locals:
            raise RuntimeError(
                "reference replay: ScoreLoss.sample was not called by EAR.sample_tokens at " + EAR_COMMIT
            )
        rows = caller.f_locals["mask_to_pred"][:bsz].nonzero(as_tuple=True)
        scoreloss_globals["torch"] = _TorchWithNoise(noise[rows] + 0.5)
        try:
            return real_sample(z, infer_temperature, cfg)
        finally:
            scoreloss_globals["torch"] = torch

    reference.sample_orders = lambda b: orders
    scoreloss.sample = sample
    try:
        latents = reference_sample(reference, labels, num_iter, cfg, temperature)
    finally:
        del reference.sample_orders, scoreloss.sample
    return reference.patchify(latents)

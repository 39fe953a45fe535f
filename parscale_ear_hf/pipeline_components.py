"""What `ParScaleEARPipeline` is built from: checks that its four components fit together and that `id2label`
is valid, its class names, class labels flattened, the VAE's spatial factor, and eval mode while sampling."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL

from .models.diffusion_head import DiffusionHead
from .models.ear_transformer import EARTransformer
from .models.energy_head import EnergyHead
from .models.lite_hybrid import LiteHybrid
from .models.lite_vae import LiteVAE
from .models.mar_transformer import MARTransformer

# What `pipe(...)` and `sample_tokens` use for an argument left out (None), unless the pipeline's saved
# `sampling_defaults` say otherwise: EAR's evaluation settings (a converted MAR pipeline saves MAR's temperature).
SAMPLING_DEFAULTS = {
    "num_inference_steps": 64,
    "guidance_scale": 3.0,
    "guidance_schedule": "linear",
    "temperature": 0.7,
}


def check_sampling_defaults(defaults) -> dict | None:
    """`defaults` (None, or a dict of some :data:`SAMPLING_DEFAULTS` keys) as stored; raise naming a wrong key or
    type (the values are checked as ``pipe(...)`` checks its arguments)."""
    if defaults is None:
        return None
    if not isinstance(defaults, dict):
        raise TypeError(f"ParScaleEARPipeline: `sampling_defaults` must be a dict or None, got {defaults!r}.")
    unknown = sorted(set(defaults) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(
            f"ParScaleEARPipeline: `sampling_defaults` has unknown key(s) {unknown}; accepted: "
            f"{', '.join(SAMPLING_DEFAULTS)}."
        )
    return dict(defaults)


def condition_width(transformer: EARTransformer | MARTransformer) -> tuple[str, int]:
    """The name and value of the backbone's config field that is the width of its output, the head's condition:
    EAR's `hidden_size`, MAR's `decoder_hidden_size`."""
    field = "decoder_hidden_size" if isinstance(transformer, MARTransformer) else "hidden_size"
    return field, getattr(transformer.config, field)


def check_components(vae, lite_hybrid, transformer, energy_head) -> None:
    """Raise a ValueError / TypeError naming the fields when the four components do not fit together."""
    expected = {
        "vae": (LiteVAE, AutoencoderKL),
        "lite_hybrid": (LiteHybrid,),
        # MAR's backbone takes the same (tokens, labels, mask) and gives one condition per position.
        "transformer": (EARTransformer, MARTransformer),
        # MAR's diffusion head fits the same slot: MAR's released models, and the baseline of the benchmarks.
        "energy_head": (EnergyHead, DiffusionHead),
    }
    given = {"vae": vae, "lite_hybrid": lite_hybrid, "transformer": transformer, "energy_head": energy_head}
    for name, classes in expected.items():
        if not isinstance(given[name], classes):
            names = " or ".join(c.__name__ for c in classes)
            raise TypeError(f"ParScaleEARPipeline: `{name}` must be a {names}, got {type(given[name]).__name__}.")
    width_field, width = condition_width(transformer)
    # (component, its config field, the transformer's config field that it must equal, and its value)
    pairs = [
        ("vae", "latent_channels", "in_channels", transformer.config.in_channels),
        ("lite_hybrid", "in_channels", "in_channels", transformer.config.in_channels),
        ("energy_head", "token_channels", "in_channels", transformer.config.in_channels),
        ("lite_hybrid", "grid_size", "grid_size", transformer.config.grid_size),
        ("energy_head", "condition_dim", width_field, width),
    ]
    for name, field, transformer_field, b in pairs:
        a = getattr(given[name].config, field)
        if a != b:
            raise ValueError(
                f"ParScaleEARPipeline: components do not fit: {name}.config.{field}={a} but "
                f"transformer.config.{transformer_field}={b} ({type(transformer).__name__}); they must be equal."
            )


def check_id2label(id2label, num_classes: int) -> dict[int, str] | None:
    """`id2label` with int keys, or None; raises naming the entry that is not ``{class id: name}``."""
    if id2label is None:
        return None
    if not isinstance(id2label, dict):
        raise TypeError(
            f"ParScaleEARPipeline: `id2label` must be a dict {{class id: name}}, got {type(id2label).__name__}."
        )
    out = {}
    for key, value in id2label.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"ParScaleEARPipeline: `id2label` key {key!r} is not a class id (an integer).") from None
        if not 0 <= idx < num_classes or not isinstance(value, str):
            raise ValueError(
                f"ParScaleEARPipeline: `id2label` entry {key!r}: {value!r} must map an id in "
                f"[0, {num_classes - 1}] to a name string."
            )
        out[idx] = value
    return out


def label_names(id2label: dict[int, str] | None) -> dict[str, int]:
    """``{name: class id}`` for every comma-separated synonym in `id2label`, sorted by name; empty without it."""
    labels = {}
    for key, value in (id2label or {}).items():
        for name in value.split(","):
            labels[name.strip()] = key
    return dict(sorted(labels.items()))


def flatten_labels(class_labels) -> list:
    """Class labels in a list, tuple, tensor or array of any shape (DiTPipeline accepts ``[[1], [1]]``), flattened."""
    if hasattr(class_labels, "tolist"):  # tensors, numpy arrays and numpy scalars
        class_labels = class_labels.tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in flatten_labels(item)]
    return [class_labels]


def vae_spatial_factor(vae) -> int:
    """Pixels per latent along a side: 2**levels of a LiteVAE, 2**(blocks - 1) of an AutoencoderKL."""
    if isinstance(vae, LiteVAE):
        return 2**vae.config.levels
    return 2 ** (len(vae.config.block_out_channels) - 1)


@contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Sample with dropout off even when a component is shared with a training loop; restore after."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)

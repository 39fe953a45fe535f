"""Convert a checkpoint of the authors' EAR (shaochenze/EAR, `main_ear.py`) into a saved pipeline.

`main_ear.py` saves ``checkpoint-last.pth`` = {"model", "model_ema", "optimizer", "epoch",
"scaler", "args"}: the state dicts use the names of `models/ear.py` (timm `Block`s as
``decoder_blocks``, the head as ``scoreloss.net``). This module maps those names onto
:class:`EARTransformer` and :class:`EnergyHead` (one table, used both ways: to load weights and
to name the authors' key in an error), reads the configuration from the tensor shapes and the
checkpoint's ``args``, and writes a :class:`ParScaleEARPipeline` with the LiteHybrid off and a
given diffusers ``AutoencoderKL`` (a folder, or MAR's ``kl16.ckpt`` converted on the way: see
`convert_vae.py`).

    parscale-ear convert --checkpoint output_dir/checkpoint-last.pth --vae kl16.ckpt --output-dir ear-b

MAR's checkpoints (LTH14/mar `main_mar.py`, MAR-B / L / H: the same format, with `encoder_blocks` and the
diffusion head as ``diffloss.net``) map the same way onto :class:`MARTransformer` and :class:`DiffusionHead`:

    parscale-ear convert --mar checkpoint-last.pth --vae kl16.ckpt --output mar-b

That writes a pipeline too, with MAR's backbone and head in the `transformer` and `energy_head` slots, a model card
(origin, MIT license, the paper) and `conversion.json` (which files it came from); see docs/mar.md.

The checkpoint is read with ``torch.load(weights_only=True)``: only tensors, plain containers and
``argparse.Namespace`` (the ``args`` entry) are rebuilt, never arbitrary objects.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import re
import shlex
import sys
import zipfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .convert_vae import (
    EAR_LATENT_SCALE,
    autoencoder_from_ldm,
    check_scaling_factor,
    read_ldm_checkpoint,
    unpickler_reason,
)
from .model_card import CONVERSION_RECORD, build_model_card
from .models import DiffusionHead, EARTransformer, EnergyHead, LiteHybrid, MARTransformer
from .models._checks import check_int
from .pipeline_parscale_ear import ParScaleEARPipeline
from .saving import atomic_save, looks_like_local_path

# EAR-B / L / H: `ear_base`, `ear_large`, `ear_huge` in models/ear.py. The number of attention
# heads is the one shape that the weights do not show.
EAR_MODELS = {
    "ear_base": dict(hidden_size=768, num_heads=12),
    "ear_large": dict(hidden_size=1024, num_heads=16),
    "ear_huge": dict(hidden_size=1280, num_heads=16),
}
WEIGHTS = ("model_ema", "model")
AUTHORS_SCRIPT = {"EAR": "shaochenze/EAR's main_ear.py", "MAR": "LTH14/mar's main_mar.py"}
# A --vae with one of these suffixes is meant as a checkpoint file, not a Hub repo id.
LDM_SUFFIXES = (".ckpt", ".pth", ".pt")

# (component, our key as a regular expression, the authors' key as its expansion template).
# `class_embedding.weight` is special: the authors keep the null class apart, as `fake_latent`.
_KEYS = [
    ("transformer", r"token_proj\.(weight|bias)", r"z_proj.\1"),
    ("transformer", r"mask_token", r"mask_token"),
    ("transformer", r"pos_embedding", r"decoder_pos_embed_learned"),
    ("transformer", r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)", r"decoder_blocks.\1.\2.\3"),
    ("transformer", r"blocks\.(\d+)\.mlp\.0\.(weight|bias)", r"decoder_blocks.\1.mlp.fc1.\2"),
    ("transformer", r"blocks\.(\d+)\.mlp\.3\.(weight|bias)", r"decoder_blocks.\1.mlp.fc2.\2"),
    ("transformer", r"norm\.(weight|bias)", r"decoder_norm.\1"),
    ("energy_head", r"z_proj\.(weight|bias)", r"scoreloss.net.input_proj.\1"),
    ("energy_head", r"noise_embed\.(weight|bias)", r"scoreloss.net.noise_embed.\1"),
    ("energy_head", r"blocks\.(\d+)\.norm\.(weight|bias)", r"scoreloss.net.res_blocks.\1.in_ln.\2"),
    ("energy_head", r"blocks\.(\d+)\.mlp\.(0|2)\.(weight|bias)", r"scoreloss.net.res_blocks.\1.mlp.\2.\3"),
    (
        "energy_head",
        r"blocks\.(\d+)\.modulation\.1\.(weight|bias)",
        r"scoreloss.net.res_blocks.\1.adaLN_modulation.1.\2",
    ),
    ("energy_head", r"final_modulation\.1\.(weight|bias)", r"scoreloss.net.final_layer.adaLN_modulation.1.\1"),
    ("energy_head", r"out\.(weight|bias)", r"scoreloss.net.final_layer.linear.\1"),
]


def _authors_key(table: list, component: str, key: str, what: str) -> str:
    for owner, ours, theirs in table:
        match = re.fullmatch(ours, key) if owner == component else None
        if match:
            return match.expand(theirs)
    raise KeyError(f"no {what} name for {component}.{key}")


def ear_key(component: str, key: str) -> str:
    """The authors' name of our ``component``'s parameter ``key`` (e.g. `transformer`, `blocks.0.mlp.0.weight`)."""
    return _authors_key(_KEYS, component, key, "EAR")


def _get(state_dict: dict, key: str, kind: str = "EAR") -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"{kind} checkpoint: the key `{key}` is missing; is this a checkpoint of {AUTHORS_SCRIPT[kind]}?"
        )
    return state_dict[key]


def ear_configs(state_dict: dict, num_heads: int | None = None, buffer_size: int = 64, **transformer_fields):
    """Configs of :class:`EARTransformer` and :class:`EnergyHead` read from an EAR state dict's shapes.

    Args:
        state_dict: an EAR model's state dict (the authors' key names).
        num_heads: attention heads; None takes EAR-B / L / H's by hidden size (768 / 1024 / 1280).
        buffer_size: EAR's `--buffer_size` (64): the pos embedding covers buffer + N positions.
        transformer_fields: training-only fields (`class_dropout_prob`, `dropout`, `mask_ratio_min`).

    Returns:
        ``(transformer_config, energy_head_config)`` with the reference's behaviour (exact GELU,
        head LayerNorm with affine, temperature on the blocks only).
    """
    class_emb = _get(state_dict, "class_emb.weight")
    num_classes, hidden = class_emb.shape
    if num_heads is None:
        by_width = {m["hidden_size"]: m["num_heads"] for m in EAR_MODELS.values()}
        if hidden not in by_width:
            raise ValueError(
                f"EAR checkpoint: hidden size {hidden} (class_emb.weight {tuple(class_emb.shape)}) is not "
                f"EAR-B / L / H's ({sorted(by_width)}), so the number of attention heads is unknown: pass --num-heads."
            )
        num_heads = by_width[hidden]
    positions = _get(state_dict, "decoder_pos_embed_learned").shape[1]
    grid_size = math.isqrt(max(positions - buffer_size, 0))
    if grid_size < 1 or grid_size**2 != positions - buffer_size:
        raise ValueError(
            f"EAR checkpoint: decoder_pos_embed_learned has {positions} positions; minus "
            f"buffer_size={buffer_size} that is not a square token grid: pass the run's --buffer-size."
        )
    num_layers = len({k.split(".")[1] for k in state_dict if k.startswith("decoder_blocks.")})
    head_depth = len({k.split(".")[3] for k in state_dict if k.startswith("scoreloss.net.res_blocks.")})
    head_width, condition_dim = _get(state_dict, "scoreloss.net.input_proj.weight").shape
    transformer = dict(
        in_channels=_get(state_dict, "z_proj.weight").shape[1],
        grid_size=grid_size,
        num_classes=num_classes,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        mlp_ratio=_get(state_dict, "decoder_blocks.0.mlp.fc1.weight").shape[0] / hidden,
        buffer_size=buffer_size,
        **transformer_fields,
    )
    energy_head = dict(
        condition_dim=condition_dim,
        token_channels=_get(state_dict, "scoreloss.net.final_layer.linear.weight").shape[0],
        width=head_width,
        depth=head_depth,
        noise_dim=_get(state_dict, "scoreloss.net.noise_embed.weight").shape[1],
        mlp_ratio=_get(state_dict, "scoreloss.net.res_blocks.0.mlp.0.weight").shape[0] / head_width,
    )
    return transformer, energy_head


def ear_state_dicts(state_dict: dict, transformer: EARTransformer, energy_head: EnergyHead) -> dict[str, dict]:
    """The tensors of an EAR state dict (or of its gradients) under our names, checked against the models.

    Returns:
        ``{"transformer": {...}, "energy_head": {...}}``, every parameter of both models.

    Raises:
        ValueError naming the authors' key: a key the models lack (missing), a tensor of another
        shape (with both shapes), or a key that belongs to no parameter (unexpected).
    """
    return _mapped_state_dicts(state_dict, {"transformer": transformer, "energy_head": energy_head}, _KEYS, "EAR")


def _mapped_state_dicts(state_dict: dict, models: dict, table: list, kind: str) -> dict[str, dict]:
    """Every parameter of ``models`` ({component: model}) taken from the authors' ``state_dict`` by ``table``.

    The class embedding (a `transformer`'s) is special: the authors keep the null class apart, as `fake_latent`.
    """
    used = {"class_emb.weight", "fake_latent"}
    class_emb, fake = _get(state_dict, "class_emb.weight", kind), _get(state_dict, "fake_latent", kind)
    out = {name: {} for name in models}
    out["transformer"]["class_embedding.weight"] = torch.cat([class_emb, fake.reshape(1, -1)])
    for name, model in models.items():
        for key, param in model.state_dict().items():
            if name == "transformer" and key == "class_embedding.weight":
                theirs, tensor = "class_emb.weight + fake_latent", out[name][key]
            else:
                theirs = _authors_key(table, name, key, kind)
                tensor = _get(state_dict, theirs, kind)
                used.add(theirs)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{kind} checkpoint: `{theirs}` has shape {tuple(tensor.shape)}, but {name}.{key} needs "
                    f"{tuple(param.shape)} (config {dict(model.config)})."
                )
            out[name][key] = tensor
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        raise ValueError(
            f"{kind} checkpoint: keys that belong to no parameter of the converted models: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; is this a checkpoint of {AUTHORS_SCRIPT[kind]}?"
        )
    return out


def ear_components(
    state_dict: dict, num_heads: int | None = None, buffer_size: int = 64, **transformer_fields
) -> tuple[EARTransformer, EnergyHead]:
    """:class:`EARTransformer` and :class:`EnergyHead` with an EAR state dict's weights (see :func:`ear_configs`)."""
    transformer_config, head_config = ear_configs(state_dict, num_heads, buffer_size, **transformer_fields)
    transformer, energy_head = EARTransformer(**transformer_config), EnergyHead(**head_config)
    mapped = ear_state_dicts(state_dict, transformer, energy_head)
    transformer.load_state_dict(mapped["transformer"])
    energy_head.load_state_dict(mapped["energy_head"])
    return transformer, energy_head


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before the checkpoint is read, flags that cannot convert: bad numbers and missing files."""
    if args.num_heads is not None:
        check_int("convert", "--num-heads", args.num_heads, 1)
    if args.buffer_size is not None:
        if args.mar:
            raise ValueError("convert: --buffer-size is for EAR checkpoints; MAR's buffer is read from its shapes.")
        check_int("convert", "--buffer-size", args.buffer_size, 1)
    check_scaling_factor("convert", "--vae-scaling-factor", args.vae_scaling_factor)
    flag, path = ("--mar", args.mar) if args.mar else ("--checkpoint", args.checkpoint)
    if not Path(path).is_file():
        script = AUTHORS_SCRIPT["MAR" if args.mar else "EAR"].split("'s ")[1]
        raise FileNotFoundError(f"convert: {flag} {path!r} is not a file; pass {script}'s checkpoint-last.pth "
                                "(or checkpoint-N.pth).")  # fmt: skip
    vae = Path(args.vae)
    local = vae.exists() or looks_like_local_path(args.vae) or vae.suffix in LDM_SUFFIXES
    if local and not (vae.is_file() or (vae / "config.json").is_file()):
        raise FileNotFoundError(
            f"convert: --vae {args.vae!r} is not a diffusers AutoencoderKL folder (no config.json there) nor a "
            "checkpoint file; pass MAR's kl16.ckpt, the folder `parscale-ear convert-vae` writes from it, or a Hub "
            "repo id of one."
        )


def read_ear_checkpoint(path: str | Path, weights: str = "model_ema") -> tuple[dict, dict]:
    """:func:`read_checkpoint` of an EAR checkpoint (main_ear.py's)."""
    return read_checkpoint(path, weights, "EAR")


def read_checkpoint(path: str | Path, weights: str = "model_ema", kind: str = "EAR") -> tuple[dict, dict]:
    """The ``weights`` state dict (`model_ema` or `model`) and the run's ``args`` (a dict; empty if absent) of a
    checkpoint of the authors' ``kind`` ("EAR" or "MAR"); a checkpoint of the other kind is refused, by name.

    Reads with ``torch.load(weights_only=True)``; `args` is an ``argparse.Namespace``, allowed as
    a safe global (rebuilding one sets attributes, nothing else).
    """
    script = AUTHORS_SCRIPT[kind].split("'s ")[1]
    if weights not in WEIGHTS:
        raise ValueError(f"convert: `--weights` must be one of {list(WEIGHTS)}, got {weights!r}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"convert: {path} is not a PyTorch checkpoint (torch.save's zip archive, as {script} writes "
            "checkpoint-last.pth); it may be truncated, damaged or another kind of file."
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = unpickler_reason(error)
        raise ValueError(
            f"convert: {path} cannot be read as tensors, plain containers and argparse.Namespace{reason}; "
            "this converter never rebuilds other objects (that would run code from the file)."
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(weights), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"convert: {path} has no `{weights}` state dict (found {found}); {script}'s checkpoint-last.pth has "
            f"`model` and `model_ema`."
        )
    check_kind(checkpoint[weights], kind, path)
    args = checkpoint.get("args")
    return checkpoint[weights], (vars(args) if isinstance(args, argparse.Namespace) else {})


# Keys that only one family's model has: MAR's encoder and diffusion head, EAR's energy head.
KIND_MARKERS = {"MAR": ("encoder_blocks.", "diffloss.net."), "EAR": ("scoreloss.net.",)}
KIND_FLAG = {"EAR": "--checkpoint", "MAR": "--mar"}


def check_kind(state_dict: dict, expected: str, path) -> None:
    """Raise when ``state_dict`` is the other family's (an EAR checkpoint given as MAR's, or the reverse)."""
    found = {kind for kind, prefixes in KIND_MARKERS.items() if any(k.startswith(prefixes) for k in state_dict)}
    if found and expected not in found:
        (other,) = found
        keys = " and ".join(f"`{prefix}*`" for prefix in KIND_MARKERS[other])
        want = " and ".join(f"`{prefix}*`" for prefix in KIND_MARKERS[expected])
        raise ValueError(
            f"convert: {path} is a checkpoint of {other} ({AUTHORS_SCRIPT[other]}: it has {keys} keys), but "
            f"{KIND_FLAG[expected]} expects one of {expected} ({AUTHORS_SCRIPT[expected]}: {want} keys); pass it as "
            f"{KIND_FLAG[other]}."
        )


def convert_ear_checkpoint(
    checkpoint: str | Path,
    vae: str | Path,
    output_dir: str | Path,
    weights: str = "model_ema",
    num_heads: int | None = None,
    buffer_size: int | None = None,
    vae_scaling_factor: float = EAR_LATENT_SCALE,
):
    """Write a :class:`ParScaleEARPipeline` from an EAR checkpoint and a VAE: a diffusers ``AutoencoderKL``
    folder (or Hub id), or a file: MAR's ``kl16.ckpt``, converted by :mod:`.convert_vae`.

    ``num_heads`` / ``buffer_size`` None: from the checkpoint's ``args`` (`--model`, `--buffer_size`),
    else EAR's defaults. Training-only fields (label dropout, dropout, mask ratio) come from
    ``args`` too. The VAE's ``scaling_factor`` is set to ``vae_scaling_factor`` (EAR: 0.2325).

    Returns:
        The pipeline, as saved.
    """
    state_dict, run_args = read_ear_checkpoint(checkpoint, weights)
    if num_heads is None and run_args.get("model") in EAR_MODELS:
        num_heads = EAR_MODELS[run_args["model"]]["num_heads"]
    training_fields = {
        ours: run_args[theirs]
        for ours, theirs in (
            ("class_dropout_prob", "label_drop_prob"),
            ("dropout", "proj_dropout"),
            ("mask_ratio_min", "mask_ratio_min"),
        )
        if theirs in run_args
    }
    transformer, energy_head = ear_components(
        state_dict,
        num_heads=num_heads,
        buffer_size=buffer_size if buffer_size is not None else run_args.get("buffer_size", 64),
        **training_fields,
    )
    autoencoder = load_vae(vae, vae_scaling_factor)
    pipe = ParScaleEARPipeline(
        vae=autoencoder, lite_hybrid=plain_lite_hybrid(transformer), transformer=transformer, energy_head=energy_head
    )
    pipe.save_pretrained(output_dir)
    return pipe


def load_vae(vae: str | Path, scaling_factor: float) -> AutoencoderKL:
    """The ``AutoencoderKL`` of a folder or Hub id, or of MAR's ``kl16.ckpt`` (converted), with ``scaling_factor``."""
    if Path(vae).is_file():
        autoencoder = autoencoder_from_ldm(read_ldm_checkpoint(vae), source=str(vae))
    else:
        autoencoder = AutoencoderKL.from_pretrained(vae)
    if getattr(autoencoder.config, "shift_factor", None):
        raise ValueError(
            f"convert: the VAE in {vae} has shift_factor={autoencoder.config.shift_factor}; EAR's and MAR's latents "
            f"are only scaled (x {EAR_LATENT_SCALE}), so it must be None or 0."
        )
    autoencoder.register_to_config(scaling_factor=scaling_factor)
    return autoencoder


# MAR-B / L / H: `mar_base`, `mar_large`, `mar_huge` in models/mar.py (encoder and decoder alike).
MAR_MODELS = {
    "mar_base": dict(hidden_size=768, num_heads=12, depth=12),
    "mar_large": dict(hidden_size=1024, num_heads=16, depth=16),
    "mar_huge": dict(hidden_size=1280, num_heads=16, depth=20),
}
# Saved in a converted MAR pipeline: MAR samples at temperature 1.0 (main_mar.py's default, and its evaluations
# with guidance), not EAR's 0.7; so ``pipe(labels)`` samples as MAR does. The steps (64) and the linear schedule are
# MAR's defaults already; MAR's guidance depends on the size (its README), so the user passes it.
MAR_SAMPLING_DEFAULTS = {"temperature": 1.0}
_MAR_BLOCK = r"(encoder|decoder)_blocks\.(\d+)"
_MAR_KEYS = [
    ("transformer", r"token_proj\.(weight|bias)", r"z_proj.\1"),
    ("transformer", r"token_norm\.(weight|bias)", r"z_proj_ln.\1"),
    ("transformer", r"encoder_pos_embedding", r"encoder_pos_embed_learned"),
    ("transformer", _MAR_BLOCK + r"\.(norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)", r"\1_blocks.\2.\3.\4"),
    ("transformer", _MAR_BLOCK + r"\.mlp\.0\.(weight|bias)", r"\1_blocks.\2.mlp.fc1.\3"),
    ("transformer", _MAR_BLOCK + r"\.mlp\.3\.(weight|bias)", r"\1_blocks.\2.mlp.fc2.\3"),
    ("transformer", r"(encoder|decoder)_norm\.(weight|bias)", r"\1_norm.\2"),
    ("transformer", r"decoder_proj\.(weight|bias)", r"decoder_embed.\1"),
    ("transformer", r"mask_token", r"mask_token"),
    ("transformer", r"decoder_pos_embedding", r"decoder_pos_embed_learned"),
    ("transformer", r"head_pos_embedding", r"diffusion_pos_embed_learned"),
    # diffusers' TimestepEmbedding names its Linears linear_1 / linear_2; MAR's Sequential has them at 0 and 2.
    ("energy_head", r"time_embed\.linear_1\.(weight|bias)", r"diffloss.net.time_embed.mlp.0.\1"),
    ("energy_head", r"time_embed\.linear_2\.(weight|bias)", r"diffloss.net.time_embed.mlp.2.\1"),
    ("energy_head", r"cond_proj\.(weight|bias)", r"diffloss.net.cond_embed.\1"),
    ("energy_head", r"input_proj\.(weight|bias)", r"diffloss.net.input_proj.\1"),
    ("energy_head", r"blocks\.(\d+)\.norm\.(weight|bias)", r"diffloss.net.res_blocks.\1.in_ln.\2"),
    ("energy_head", r"blocks\.(\d+)\.mlp\.(0|2)\.(weight|bias)", r"diffloss.net.res_blocks.\1.mlp.\2.\3"),
    (
        "energy_head",
        r"blocks\.(\d+)\.modulation\.1\.(weight|bias)",
        r"diffloss.net.res_blocks.\1.adaLN_modulation.1.\2",
    ),
    ("energy_head", r"final_modulation\.1\.(weight|bias)", r"diffloss.net.final_layer.adaLN_modulation.1.\1"),
    ("energy_head", r"out\.(weight|bias)", r"diffloss.net.final_layer.linear.\1"),
]


def mar_key(component: str, key: str) -> str:
    """MAR's name of our ``component``'s parameter ``key`` (`transformer`: :class:`MARTransformer`, `energy_head`:
    :class:`DiffusionHead`), e.g. `decoder_blocks.0.mlp.0.weight` -> `decoder_blocks.0.mlp.fc1.weight`."""
    return _authors_key(_MAR_KEYS, component, key, "MAR")


def _num_heads(hidden: int, num_heads: int | None, tensor_name: str) -> int:
    if num_heads is not None:
        return num_heads
    by_width = {m["hidden_size"]: m["num_heads"] for m in MAR_MODELS.values()}
    if hidden not in by_width:
        raise ValueError(
            f"MAR checkpoint: width {hidden} ({tensor_name}) is not MAR-B / L / H's ({sorted(by_width)}), so the "
            "number of attention heads is unknown: pass --num-heads."
        )
    return by_width[hidden]


def mar_configs(state_dict: dict, num_heads: int | None = None, num_sampling_steps: int = 100, **training_fields):
    """Configs of :class:`MARTransformer` and :class:`DiffusionHead` read from a MAR state dict's shapes.

    Args:
        state_dict: a MAR model's state dict (MAR's key names).
        num_heads: attention heads of encoder and decoder; None takes MAR-B / L / H's by width.
        num_sampling_steps: MAR's `--num_sampling_steps` (100): the respacing of the head's sampler.
        training_fields: training-only fields (`class_dropout_prob`, `attn_dropout`, `proj_dropout`, `mask_ratio_min`).

    Returns:
        ``(transformer_config, head_config)``; token grid and buffer come from the position embeddings.
    """
    num_classes, enc = _get(state_dict, "class_emb.weight", "MAR").shape
    dec = _get(state_dict, "decoder_embed.weight", "MAR").shape[0]
    num_tokens = _get(state_dict, "diffusion_pos_embed_learned", "MAR").shape[1]
    positions = _get(state_dict, "encoder_pos_embed_learned", "MAR").shape[1]
    grid_size = math.isqrt(num_tokens)
    if grid_size**2 != num_tokens or positions <= num_tokens:
        raise ValueError(
            f"MAR checkpoint: diffusion_pos_embed_learned has {num_tokens} positions (not a square token grid) or "
            f"encoder_pos_embed_learned's {positions} leave no buffer; is this a checkpoint of main_mar.py?"
        )

    def depth(prefix, index):
        return len({k.split(".")[index] for k in state_dict if k.startswith(prefix)})

    transformer = dict(
        in_channels=_get(state_dict, "z_proj.weight", "MAR").shape[1],
        grid_size=grid_size,
        num_classes=num_classes,
        encoder_hidden_size=enc,
        encoder_num_layers=depth("encoder_blocks.", 1),
        encoder_num_heads=_num_heads(enc, num_heads, "class_emb.weight"),
        decoder_hidden_size=dec,
        decoder_num_layers=depth("decoder_blocks.", 1),
        decoder_num_heads=_num_heads(dec, num_heads, "decoder_embed.weight"),
        mlp_ratio=_get(state_dict, "encoder_blocks.0.mlp.fc1.weight", "MAR").shape[0] / enc,
        buffer_size=positions - num_tokens,
        **training_fields,
    )
    width, channels = _get(state_dict, "diffloss.net.input_proj.weight", "MAR").shape
    head = dict(
        condition_dim=_get(state_dict, "diffloss.net.cond_embed.weight", "MAR").shape[1],
        token_channels=channels,
        width=width,
        depth=depth("diffloss.net.res_blocks.", 3),
        num_sampling_steps=num_sampling_steps,
        mlp_ratio=_get(state_dict, "diffloss.net.res_blocks.0.mlp.0.weight", "MAR").shape[0] / width,
    )
    return transformer, head


def mar_state_dicts(state_dict: dict, transformer: MARTransformer, head: DiffusionHead) -> dict[str, dict]:
    """The tensors of a MAR state dict (or of its gradients) under our names, checked against the models.

    Returns:
        ``{"transformer": {...}, "energy_head": {...}}``, every parameter of both models.

    Raises:
        ValueError naming MAR's key: missing, of another shape (both shapes), or unexpected.
    """
    return _mapped_state_dicts(state_dict, {"transformer": transformer, "energy_head": head}, _MAR_KEYS, "MAR")


def mar_components(
    state_dict: dict, num_heads: int | None = None, num_sampling_steps: int = 100, **training_fields
) -> tuple[MARTransformer, DiffusionHead]:
    """:class:`MARTransformer` and :class:`DiffusionHead` with a MAR state dict's weights (see :func:`mar_configs`)."""
    transformer_config, head_config = mar_configs(state_dict, num_heads, num_sampling_steps, **training_fields)
    transformer, head = MARTransformer(**transformer_config), DiffusionHead(**head_config)
    mapped = mar_state_dicts(state_dict, transformer, head)
    transformer.load_state_dict(mapped["transformer"])
    head.load_state_dict(mapped["energy_head"])
    return transformer, head


def mar_model_name(transformer: MARTransformer, run_args: dict) -> tuple[str | None, str]:
    """MAR's `--model` (`mar_base`, ...) and its name (MAR-B / L / H) from the run's ``args``, else from the widths
    and depths; a size MAR did not release is named by its sizes."""
    t = transformer.config
    sizes = {(t.encoder_hidden_size, t.encoder_num_layers), (t.decoder_hidden_size, t.decoder_num_layers)}
    model = run_args.get("model")
    if model not in MAR_MODELS:
        model = next((m for m, c in MAR_MODELS.items() if sizes == {(c["hidden_size"], c["depth"])}), None)
    if model is None:
        encoder, decoder = (f"{w}x{d}" for w, d in ((t.encoder_hidden_size, t.encoder_num_layers),
                                                    (t.decoder_hidden_size, t.decoder_num_layers)))  # fmt: skip
        return None, f"MAR (encoder {encoder}, decoder {decoder})"
    return model, "MAR-" + model.split("_")[1][0].upper()


def imagenet_id2label() -> dict[int, str] | None:
    """ImageNet-1k's class names by class id (``{0: "tench, Tinca tinca", ...}``), read offline from the files that
    the `timm` package ships (its synset list, sorted as ImageFolder sorts the training folders, as MAR's classes
    are, and WordNet lemmas), without importing timm; None when timm is not installed."""
    try:
        dist = importlib.metadata.distribution("timm")
    except importlib.metadata.PackageNotFoundError:
        return None
    synsets_path = Path(dist.locate_file("timm/data/_info/imagenet_synsets.txt"))
    lemmas_path = Path(dist.locate_file("timm/data/_info/imagenet_synset_to_lemma.txt"))
    if not (synsets_path.is_file() and lemmas_path.is_file()):
        return None
    synsets = synsets_path.read_text(encoding="utf-8").split()
    lemmas = dict(line.split("\t", 1) for line in lemmas_path.read_text(encoding="utf-8").splitlines() if "\t" in line)
    if len(synsets) != 1000 or synsets != sorted(synsets) or not all(s in lemmas for s in synsets):
        return None
    return {i: lemmas[s].strip() for i, s in enumerate(synsets)}


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_mar_checkpoint(
    checkpoint: str | Path,
    vae: str | Path,
    output_dir: str | Path,
    weights: str = "model_ema",
    num_heads: int | None = None,
    vae_scaling_factor: float = EAR_LATENT_SCALE,
    command: str | None = None,
) -> ParScaleEARPipeline:
    """Write a :class:`ParScaleEARPipeline` from a MAR checkpoint (LTH14/mar's main_mar.py, MAR-B / L / H) and a VAE:
    :class:`MARTransformer`, :class:`DiffusionHead`, the LiteHybrid off and the ``AutoencoderKL`` (a folder or Hub
    id, or MAR's ``kl16.ckpt``, converted), with a model card (`README.md`: origin, MIT license, the paper) and
    `conversion.json` (the files it came from).

    ``num_heads`` None: from the checkpoint's ``args.model`` (MAR-B / L / H), else by width. The head's respacing
    is ``args.num_sampling_steps`` (MAR: "100"); training-only fields come from ``args`` too. A 1000-class model
    gets ImageNet's class names as `id2label` when timm's class list is installed (:func:`imagenet_id2label`).
    Everything is read and checked (the VAE's channels against the tokens') before the folder is written,
    atomically: on an error an existing `output_dir` is left as it was.

    Returns:
        The pipeline, as saved.
    """
    state_dict, run_args = read_checkpoint(checkpoint, weights, "MAR")
    if num_heads is None and run_args.get("model") in MAR_MODELS:
        num_heads = MAR_MODELS[run_args["model"]]["num_heads"]
    steps = str(run_args.get("num_sampling_steps", "100"))
    if not steps.isdigit():
        raise ValueError(
            f"convert: {checkpoint} was trained with --num_sampling_steps {steps!r}; the converter takes MAR's even "
            "respacing, a number of steps (MAR: '100'), not sections or 'ddimN'."
        )
    fields = ("label_drop_prob", "attn_dropout", "proj_dropout", "mask_ratio_min")
    training_fields = {
        ("class_dropout_prob" if theirs == "label_drop_prob" else theirs): run_args[theirs]
        for theirs in fields
        if theirs in run_args
    }
    transformer, head = mar_components(state_dict, num_heads, int(steps), **training_fields)
    autoencoder = load_vae(vae, vae_scaling_factor)
    channels = transformer.config.in_channels
    if autoencoder.config.latent_channels != channels:
        raise ValueError(
            f"convert: the MAR checkpoint {checkpoint} takes tokens of {channels} channels (z_proj.weight "
            f"{tuple(state_dict['z_proj.weight'].shape)}), but the VAE {vae} has latent_channels="
            f"{autoencoder.config.latent_channels}; MAR-B / L / H take MAR's KL-16 VAE (kl16.ckpt, 16 channels)."
        )
    model, name = mar_model_name(transformer, run_args)
    id2label = imagenet_id2label() if transformer.config.num_classes == 1000 else None
    pipe = ParScaleEARPipeline(
        vae=autoencoder, lite_hybrid=plain_lite_hybrid(transformer), transformer=transformer, energy_head=head,
        id2label=id2label, sampling_defaults=MAR_SAMPLING_DEFAULTS,
    )  # fmt: skip
    record = {
        "source": "LTH14/mar",
        "script": "main_mar.py",
        "model": model,
        "name": name,
        "checkpoint": Path(checkpoint).name,
        "checkpoint_sha256": _sha256(checkpoint),
        "weights": weights,
        "vae": Path(vae).name if Path(vae).is_file() else os.fspath(vae),
        "vae_scaling_factor": vae_scaling_factor,
        "command": command or f"parscale-ear convert --mar {checkpoint} --vae {vae} --output {output_dir}",
        "id2label": "ImageNet-1k class names from timm's class list" if id2label else None,
    }

    def write(folder: str) -> None:
        pipe.save_pretrained(folder)
        with open(os.path.join(folder, CONVERSION_RECORD), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        card = build_model_card(folder, [], pipe=pipe, location=output_dir)
        card.save(os.path.join(folder, "README.md"))

    atomic_save(output_dir, write, "convert")
    return pipe


def plain_lite_hybrid(transformer: EARTransformer | MARTransformer) -> LiteHybrid:
    """The LiteHybrid with both branches off (the identity: the authors' models have none). The coarse grid only
    has to divide the token grid."""
    return LiteHybrid(
        in_channels=transformer.config.in_channels,
        grid_size=transformer.config.grid_size,
        coarse_grid_size=1,
        use_coarse=False,
        use_fine=False,
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="EAR: main_ear.py's checkpoint-last.pth (or checkpoint-N.pth)")
    source.add_argument(
        "--mar",
        help="MAR-B/L/H: main_mar.py's checkpoint-last.pth; writes a pipeline with MAR's backbone and diffusion head",
    )
    parser.add_argument(
        "--vae",
        required=True,
        help="MAR's kl16.ckpt (converted on the way), or a diffusers AutoencoderKL folder (parscale-ear convert-vae)",
    )
    parser.add_argument("--output-dir", "--output", dest="output_dir", required=True, help="where to write it")
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="model_ema",
        help="which state dict: the EMA (default) or the raw weights",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads (default: from the checkpoint's --model, EAR-B/L/H or MAR-B/L/H, else by width)",
    )
    parser.add_argument(
        "--buffer-size", type=int, default=None, help="EAR's --buffer_size (default: from the checkpoint, else 64)"
    )
    parser.add_argument(
        "--vae-scaling-factor",
        type=float,
        default=EAR_LATENT_SCALE,
        help=f"latent scale the model was trained with (EAR: {EAR_LATENT_SCALE})",
    )
    return parser


def run(args: argparse.Namespace) -> None:
    """Convert a checkpoint of the authors' EAR (shaochenze/EAR main_ear.py) or MAR (LTH14/mar main_mar.py) into a
    saved pipeline."""
    check_arguments(args)
    if args.mar:
        pipe = convert_mar_checkpoint(
            args.mar,
            args.vae,
            args.output_dir,
            weights=args.weights,
            num_heads=args.num_heads,
            vae_scaling_factor=args.vae_scaling_factor,
            command=" ".join(["parscale-ear", *map(shlex.quote, sys.argv[1:])])
            if sys.argv[1:2] == ["convert"]
            else None,
        )
        t, h = pipe.transformer.config, pipe.energy_head.config
        print(
            f"wrote {args.output_dir}: {args.weights} of {args.mar}, MAR encoder {t.encoder_hidden_size}x"
            f"{t.encoder_num_layers} + decoder {t.decoder_hidden_size}x{t.decoder_num_layers} ({t.grid_size}x"
            f"{t.grid_size} tokens, {t.num_classes} classes{', ImageNet names' if pipe.id2label else ''}), diffusion "
            f"head {h.width}x{h.depth} ({h.num_sampling_steps} steps), VAE scaling_factor "
            f"{pipe.vae.config.scaling_factor}; model card README.md"
        )
        return
    pipe = convert_ear_checkpoint(
        args.checkpoint,
        args.vae,
        args.output_dir,
        weights=args.weights,
        num_heads=args.num_heads,
        buffer_size=args.buffer_size,
        vae_scaling_factor=args.vae_scaling_factor,
    )
    t, h = pipe.transformer.config, pipe.energy_head.config
    print(
        f"wrote {args.output_dir}: {args.weights} of {args.checkpoint}, backbone {t.hidden_size}x{t.num_layers} "
        f"({t.num_heads} heads, {t.grid_size}x{t.grid_size} tokens, {t.num_classes} classes), head "
        f"{h.width}x{h.depth}, VAE scaling_factor {pipe.vae.config.scaling_factor}"
    )

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

The checkpoint is read with ``torch.load(weights_only=True)``: only tensors, plain containers and
``argparse.Namespace`` (the ``args`` entry) are rebuilt, never arbitrary objects.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
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
from .models import EARTransformer, EnergyHead, LiteHybrid
from .models._checks import check_int
from .pipeline_parscale_ear import ParScaleEARPipeline
from .saving import looks_like_local_path

# EAR-B / L / H: `ear_base`, `ear_large`, `ear_huge` in models/ear.py. The number of attention
# heads is the one shape that the weights do not show.
EAR_MODELS = {
    "ear_base": dict(hidden_size=768, num_heads=12),
    "ear_large": dict(hidden_size=1024, num_heads=16),
    "ear_huge": dict(hidden_size=1280, num_heads=16),
}
WEIGHTS = ("model_ema", "model")
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


def ear_key(component: str, key: str) -> str:
    """The authors' name of our ``component``'s parameter ``key`` (e.g. `transformer`, `blocks.0.mlp.0.weight`)."""
    for owner, ours, theirs in _KEYS:
        match = re.fullmatch(ours, key) if owner == component else None
        if match:
            return match.expand(theirs)
    raise KeyError(f"no EAR name for {component}.{key}")


def _get(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"EAR checkpoint: the key `{key}` is missing; is this a checkpoint of shaochenze/EAR's main_ear.py?"
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
    used = {"class_emb.weight", "fake_latent"}
    class_emb, fake = _get(state_dict, "class_emb.weight"), _get(state_dict, "fake_latent")
    out = {"transformer": {"class_embedding.weight": torch.cat([class_emb, fake.reshape(1, -1)])}, "energy_head": {}}
    for name, model in (("transformer", transformer), ("energy_head", energy_head)):
        for key, param in model.state_dict().items():
            if key == "class_embedding.weight":
                theirs, tensor = "class_emb.weight + fake_latent", out[name][key]
            else:
                theirs = ear_key(name, key)
                tensor = _get(state_dict, theirs)
                used.add(theirs)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"EAR checkpoint: `{theirs}` has shape {tuple(tensor.shape)}, but {name}.{key} needs "
                    f"{tuple(param.shape)} (config {dict(model.config)})."
                )
            out[name][key] = tensor
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        raise ValueError(
            f"EAR checkpoint: keys that belong to no parameter of the converted models: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}; is this a checkpoint of shaochenze/EAR's main_ear.py?"
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
        check_int("convert", "--buffer-size", args.buffer_size, 1)
    check_scaling_factor("convert", "--vae-scaling-factor", args.vae_scaling_factor)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"convert: --checkpoint {args.checkpoint!r} is not a file; pass main_ear.py's "
                                "checkpoint-last.pth (or checkpoint-N.pth).")  # fmt: skip
    vae = Path(args.vae)
    local = vae.exists() or looks_like_local_path(args.vae) or vae.suffix in LDM_SUFFIXES
    if local and not (vae.is_file() or (vae / "config.json").is_file()):
        raise FileNotFoundError(
            f"convert: --vae {args.vae!r} is not a diffusers AutoencoderKL folder (no config.json there) nor a "
            "checkpoint file; pass MAR's kl16.ckpt, the folder `parscale-ear convert-vae` writes from it, or a Hub "
            "repo id of one."
        )


def read_ear_checkpoint(path: str | Path, weights: str = "model_ema") -> tuple[dict, dict]:
    """The ``weights`` state dict (`model_ema` or `model`) and the run's ``args`` (a dict; empty if absent).

    Reads with ``torch.load(weights_only=True)``; `args` is an ``argparse.Namespace``, allowed as
    a safe global (rebuilding one sets attributes, nothing else).
    """
    if weights not in WEIGHTS:
        raise ValueError(f"convert: `--weights` must be one of {list(WEIGHTS)}, got {weights!r}.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"convert: {path} is not a PyTorch checkpoint (torch.save's zip archive, as main_ear.py writes "
            "checkpoint-last.pth); it may be damaged or another kind of file."
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        reason = unpickler_reason(error)
        raise ValueError(
            f"convert: {path} cannot be read as tensors, plain containers and argparse.Namespace{reason}; "
            "this converter never rebuilds other objects (that would run code from the file)."
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(weights), dict):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"convert: {path} has no `{weights}` state dict (found {found}); main_ear.py's checkpoint-last.pth has "
            f"`model` and `model_ema`."
        )
    args = checkpoint.get("args")
    return checkpoint[weights], (vars(args) if isinstance(args, argparse.Namespace) else {})


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
    if Path(vae).is_file():
        autoencoder = autoencoder_from_ldm(read_ldm_checkpoint(vae), source=str(vae))
    else:
        autoencoder = AutoencoderKL.from_pretrained(vae)
    if getattr(autoencoder.config, "shift_factor", None):
        raise ValueError(
            f"convert: the VAE in {vae} has shift_factor={autoencoder.config.shift_factor}; EAR's latents are only "
            f"scaled (x {EAR_LATENT_SCALE}), so it must be None or 0."
        )
    autoencoder.register_to_config(scaling_factor=vae_scaling_factor)
    # Both branches off: plain EAR. The coarse grid only has to divide the token grid.
    lite_hybrid = LiteHybrid(
        in_channels=transformer.config.in_channels,
        grid_size=transformer.config.grid_size,
        coarse_grid_size=1,
        use_coarse=False,
        use_fine=False,
    )
    pipe = ParScaleEARPipeline(
        vae=autoencoder, lite_hybrid=lite_hybrid, transformer=transformer, energy_head=energy_head
    )
    pipe.save_pretrained(output_dir)
    return pipe


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", required=True, help="main_ear.py's checkpoint-last.pth (or checkpoint-N.pth)")
    parser.add_argument(
        "--vae",
        required=True,
        help="MAR's kl16.ckpt (converted on the way), or a diffusers AutoencoderKL folder (parscale-ear convert-vae)",
    )
    parser.add_argument("--output-dir", required=True, help="where to write the pipeline")
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
        help="attention heads (default: from the checkpoint's --model, EAR-B/L/H)",
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
    """Convert an EAR checkpoint (shaochenze/EAR main_ear.py) into a saved pipeline."""
    check_arguments(args)
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

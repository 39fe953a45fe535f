"""Convert MAR's KL-16 VAE (``kl16.ckpt``, used by MAR and EAR) into a diffusers ``AutoencoderKL``.

``kl16.ckpt`` is ``{"model": state_dict}`` of LTH14/mar's ``models/vae.py`` (LDM's KL-VAE),
built by main_mar.py as ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``: ch 128, 2 res
blocks per level, attention in the encoder's last level (16x16) and in both mid blocks, none in
the decoder's levels (its ``Decoder`` keeps ``attn_resolutions=()``), GroupNorm(32, eps 1e-6),
swish, Downsample = pad (0, 1, 0, 1) then a stride-2 conv, Upsample = nearest then a conv.
diffusers' ``AutoencoderKL`` with :data:`KL16_CONFIG` is that network layer for layer:
``AttnDownEncoderBlock2D`` is LDM's res block + ``AttnBlock`` pairs (one head over all channels,
scale C^-1/2, GroupNorm first, residual), ``Downsample2D(padding=0)`` pads (0, 1, 0, 1).

    parscale-ear convert-vae --checkpoint kl16.ckpt --output-dir kl16-diffusers [--scaling-factor 0.2325]

One table names every diffusers parameter's LDM key; it loads the weights and names the keys in
errors. diffusers' own ``convert_ldm_vae_checkpoint`` is not used: it leaves attention inside the
encoder's levels (``encoder.down.4.attn.*``) under its LDM name, and passes on keys it does not
know instead of refusing them.

The checkpoint is read with ``torch.load(weights_only=True)``: ``{"model": sd}`` (MAR),
``{"state_dict": sd}`` (an LDM / Lightning checkpoint) or a bare state dict. LDM's ``loss.*``
keys (LPIPS and the discriminator, saved by LDM's training) are not part of the VAE and are
ignored; any other key the VAE lacks, a missing key or a tensor of another shape is refused.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

# main_ear.py multiplies the KL-16 posterior sample by this (engine_ear.py: "normalize the std
# of latent to be 1"), so the converted pipeline's VAE must have it as `scaling_factor`.
EAR_LATENT_SCALE = 0.2325


def unpickler_reason(error: Exception) -> str:
    """The cause that torch's weights-only unpickler gives (its advice to turn the check off is left out)."""
    _, found, rest = str(error).partition("WeightsUnpickler error:")
    reason = next((part.strip() for part in rest.split("\n\n") if part.strip()), "") if found else ""
    return f" ({' '.join(reason.split())})" if reason else ""


def check_scaling_factor(owner: str, name: str, value: float) -> None:
    """Raise unless the latent scale ``value`` is a finite number above 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}: `{name}` must be a finite number above 0, got {value!r}.")


def mar_vae_config(
    block_out_channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    sample_size: int,
    scaling_factor: float = EAR_LATENT_SCALE,
) -> dict:
    """The diffusers ``AutoencoderKL`` config of MAR's ``models/vae.py`` ``AutoencoderKL``.

    Args:
        block_out_channels: channels per level, ``ch * ch_mult`` (KL-16: 128 x (1, 1, 2, 2, 4)); ``ch_mult``
            must start with 1, as diffusers' ``conv_in`` writes ``block_out_channels[0]`` channels, LDM's ``ch``.
        layers_per_block: ``num_res_blocks`` (the decoder has one more per level, in both).
        latent_channels: ``embed_dim`` (the encoder writes 2x: mean and log-variance).
        sample_size: image side; the latents are ``sample_size / 2**(levels - 1)`` on a side.
        scaling_factor: the latent scale of the generator trained on it (MAR / EAR: 0.2325).
    """
    levels = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        # Attention in the encoder's last level only: MAR's attn_resolutions=(16,) at 256 / 2**4.
        down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


# MAR's kl16.ckpt: 256x256 images -> 16x16x16 latents.
KL16_CONFIG = mar_vae_config((128, 128, 256, 256, 512), layers_per_block=2, latent_channels=16, sample_size=256)

# (diffusers AutoencoderKL key, LDM key). `{layer}` is renamed by _LDM_LAYER; `{up}` is LDM's
# index of a decoder level: diffusers counts `up_blocks` from the lowest resolution, LDM's
# `decoder.up` from the highest (levels - 1 - level).
_PART, _L, _I = r"(?P<part>encoder|decoder)", r"(?P<level>\d+)", r"(?P<i>\d+)"
_RES = r"(?P<layer>norm1|conv1|norm2|conv2|conv_shortcut)"  # a ResnetBlock2D's layers
_ATTN = r"(?P<layer>group_norm|to_q|to_k|to_v|to_out\.0)"  # an Attention's layers
_P = r"\.(?P<param>weight|bias)"
_KEYS = [
    (rf"(?P<layer>quant_conv|post_quant_conv){_P}",                 "{layer}.{param}"),
    (rf"{_PART}\.(?P<layer>conv_in|conv_norm_out|conv_out){_P}",    "{part}.{layer}.{param}"),
    (rf"encoder\.down_blocks\.{_L}\.resnets\.{_I}\.{_RES}{_P}",     "encoder.down.{level}.block.{i}.{layer}.{param}"),
    (rf"encoder\.down_blocks\.{_L}\.attentions\.{_I}\.{_ATTN}{_P}", "encoder.down.{level}.attn.{i}.{layer}.{param}"),
    (rf"encoder\.down_blocks\.{_L}\.downsamplers\.0\.conv{_P}",     "encoder.down.{level}.downsample.conv.{param}"),
    (rf"{_PART}\.mid_block\.resnets\.0\.{_RES}{_P}",                "{part}.mid.block_1.{layer}.{param}"),
    (rf"{_PART}\.mid_block\.resnets\.1\.{_RES}{_P}",                "{part}.mid.block_2.{layer}.{param}"),
    (rf"{_PART}\.mid_block\.attentions\.0\.{_ATTN}{_P}",            "{part}.mid.attn_1.{layer}.{param}"),
    (rf"decoder\.up_blocks\.{_L}\.resnets\.{_I}\.{_RES}{_P}",       "decoder.up.{up}.block.{i}.{layer}.{param}"),
    (rf"decoder\.up_blocks\.{_L}\.upsamplers\.0\.conv{_P}",         "decoder.up.{up}.upsample.conv.{param}"),
]  # fmt: skip
_LDM_LAYER = {"conv_norm_out": "norm_out", "conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q",
              "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}  # fmt: skip
# Keys of LDM's training losses (LPIPS, discriminator), saved beside the VAE's.
_LOSS_PREFIX = "loss."


def ldm_key(key: str, levels: int) -> str:
    """The LDM name of the diffusers ``AutoencoderKL`` parameter ``key`` (``levels``: its number of levels)."""
    for ours, theirs in _KEYS:
        match = re.fullmatch(ours, key)
        if match:
            fields = match.groupdict()
            if fields.get("layer"):
                fields["layer"] = _LDM_LAYER.get(fields["layer"], fields["layer"])
            if fields.get("level") is not None:
                fields["up"] = levels - 1 - int(fields["level"])
            return theirs.format(**fields)
    raise KeyError(f"no LDM name for the AutoencoderKL parameter {key}")


def ldm_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The LDM shape of a diffusers parameter's: attention's Linear (C, C) is a 1x1 conv (C, C, 1, 1) there."""
    return (*shape, 1, 1) if len(shape) == 2 else tuple(shape)


def _describe(config) -> str:
    channels = tuple(config["block_out_channels"])
    return (
        f"an LDM KL-VAE as MAR's models/vae.py builds it, with channels {channels} per level, "
        f"num_res_blocks {config['layers_per_block']}, embed_dim {config['latent_channels']} and attention in the "
        "encoder's last level"
    )


def _listed(items: list[str], what: str) -> str:
    return f"{len(items)} {what} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"


def ldm_to_diffusers(state_dict: dict, autoencoder, source: str = "the checkpoint") -> dict:
    """An LDM KL-VAE state dict under ``autoencoder``'s (a diffusers ``AutoencoderKL``) names and shapes.

    Args:
        state_dict: LDM names (``encoder.down.0.block.0.conv1.weight``, ...); ``loss.*`` keys are ignored.
        autoencoder: gives the names, the shapes and the number of levels (it may be on the meta device).
        source: how errors name the state dict (e.g. its file).

    Returns:
        Every parameter of ``autoencoder``, in its dtype; attention's 1x1 convs (C, C, 1, 1) as Linear (C, C).

    Raises:
        ValueError naming the LDM keys that are missing, of another shape (both shapes given) or
        unexpected: the first few and the count of each, and the architecture that is accepted.
    """
    levels = len(autoencoder.config.block_out_channels)
    mapped, missing, shapes, used = {}, [], [], set()
    for key, param in autoencoder.state_dict().items():
        theirs, want = ldm_key(key, levels), ldm_shape(param.shape)
        if theirs not in state_dict:
            missing.append(f"`{theirs}`")
            continue
        used.add(theirs)
        tensor = state_dict[theirs]
        if tuple(tensor.shape) != want:
            shapes.append(f"`{theirs}` {tuple(tensor.shape)} where {want} is needed")
            continue
        mapped[key] = tensor.reshape(param.shape).to(param.dtype)
    unexpected = sorted(f"`{k}`" for k in set(state_dict) - used if not k.startswith(_LOSS_PREFIX))
    if missing or shapes or unexpected:
        problems = [
            _listed(items, what)
            for items, what in ((missing, "missing"), (shapes, "of another shape"), (unexpected, "unexpected"))
            if items
        ]
        vq = "quantize.embedding.weight" in state_dict
        vq = " It has a VQ codebook (`quantize.embedding.weight`): a VQ model, not a KL one." if vq else ""
        accepted = _describe(autoencoder.config)
        raise ValueError(f"{source} is not the VAE to convert; keys {'; '.join(problems)}.{vq} Accepted: {accepted}.")
    return mapped


def read_ldm_checkpoint(path: str | Path) -> dict:
    """The state dict of an LDM KL-VAE checkpoint: ``{"model": sd}``, ``{"state_dict": sd}`` or ``sd`` itself.

    Read with ``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (torch.save's zip archive, as MAR's kl16.ckpt is); it may be damaged "
            "or another kind of file."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        reason = unpickler_reason(error)
        raise ValueError(
            f"{path} cannot be read as tensors and plain containers{reason}; this converter never rebuilds "
            "other objects (that would run code from the file)."
        ) from error
    for name in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(name), dict):
            checkpoint = checkpoint[name]
            break
    if not (isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values())):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{path} holds no state dict of tensors (found {found}); accepted: {{'model': state_dict}} (MAR's "
            "kl16.ckpt), {'state_dict': state_dict} (LDM) or the state dict itself."
        )
    return checkpoint


def autoencoder_from_ldm(state_dict: dict, config: dict = KL16_CONFIG, source: str = "the checkpoint"):
    """A diffusers ``AutoencoderKL`` of ``config`` (default: MAR's KL-16) with an LDM state dict's weights.

    The model is built on the meta device and takes the checkpoint's tensors, in float32 as MAR's
    model loads them: nothing is initialised only to be overwritten. Refusals: see :func:`ldm_to_diffusers`.
    """
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        autoencoder = AutoencoderKL(**config)
    autoencoder.load_state_dict(ldm_to_diffusers(state_dict, autoencoder, source), assign=True)
    return autoencoder.eval()


def convert_vae_checkpoint(checkpoint: str | Path, output_dir: str | Path, scaling_factor: float = EAR_LATENT_SCALE):
    """Write MAR's ``kl16.ckpt`` (or an LDM checkpoint of the same VAE) as a diffusers ``AutoencoderKL`` folder.

    Returns:
        The ``AutoencoderKL``, as saved (``config.json``: :data:`KL16_CONFIG` with ``scaling_factor``).
    """
    config = {**KL16_CONFIG, "scaling_factor": scaling_factor}
    autoencoder = autoencoder_from_ldm(read_ldm_checkpoint(checkpoint), config, source=str(checkpoint))
    autoencoder.save_pretrained(output_dir)
    return autoencoder


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before the checkpoint is read, a missing file and a scaling factor that is not above 0."""
    check_scaling_factor("convert-vae", "--scaling-factor", args.scaling_factor)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(
            f"convert-vae: --checkpoint {args.checkpoint!r} is not a file; pass MAR's kl16.ckpt "
            "(pretrained_models/vae/kl16.ckpt in MAR's README)."
        )
    if Path(args.output_dir).is_file():
        raise FileExistsError(f"convert-vae: --output-dir {args.output_dir!r} is a file; pass a folder to write.")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", required=True, help="MAR's kl16.ckpt ({'model': state_dict}, LDM names)")
    parser.add_argument("--output-dir", required=True, help="where to write the diffusers AutoencoderKL folder")
    parser.add_argument(
        "--scaling-factor",
        type=float,
        default=EAR_LATENT_SCALE,
        help=f"the config's scaling_factor: the latent scale of the generator (MAR and EAR: {EAR_LATENT_SCALE})",
    )
    return parser


def run(args: argparse.Namespace) -> None:
    """Convert MAR's KL-16 VAE (kl16.ckpt) into a diffusers AutoencoderKL folder."""
    check_arguments(args)
    autoencoder = convert_vae_checkpoint(args.checkpoint, args.output_dir, args.scaling_factor)
    c = autoencoder.config
    side = c.sample_size // 2 ** (len(c.block_out_channels) - 1)
    print(
        f"wrote {args.output_dir}: {args.checkpoint} as a diffusers AutoencoderKL "
        f"({sum(p.numel() for p in autoencoder.parameters()):,d} parameters, {c.sample_size}x{c.sample_size} images "
        f"-> {side}x{side}x{c.latent_channels} latents, scaling_factor {c.scaling_factor})"
    )

"""Parameter counts of the components, by code (the README's component table comes from here)."""

from __future__ import annotations

import torch

from .models import EARTransformer, EnergyHead, LiteHybrid, LiteVAE

COMPONENT_ROLES = {
    "vae.encoder": ("LiteVAE", "Haar-DWT encoder: image (B, 3, 256, 256) -> posterior over (B, 32, 16, 16)"),
    "vae.decoder": ("LiteVAE", "decoder: latent (B, 32, 16, 16) -> image (B, 3, 256, 256)"),
    "lite_hybrid": ("LiteHybrid", "coarse 4x4 + fine branches on visible tokens (B, 256, 32) -> (B, 256, 32)"),
    "transformer": ("EARTransformer", "masked-AR backbone, 64 buffer + 256 token positions -> (B, 256, 768)"),
    "energy_head": ("EnergyHead", "one-step sampler: hidden (M, 768) + noise U[-0.5,0.5]^64 -> token (M, 32)"),
}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def component_parameter_counts(vae, lite_hybrid, transformer, energy_head) -> dict[str, int]:
    """Parameters per component (the VAE split into encoder and decoder)."""
    counts = {
        "vae.encoder": count_parameters(vae.encoder),
        "vae.decoder": count_parameters(vae.decoder),
        "lite_hybrid": count_parameters(lite_hybrid),
        "transformer": count_parameters(transformer),
        "energy_head": count_parameters(energy_head),
    }
    counts["generator_total"] = counts["lite_hybrid"] + counts["transformer"] + counts["energy_head"]
    return counts


def pipeline_summary(pipe) -> dict:
    """What a pipeline makes and how big it is.

    Args:
        pipe: a :class:`~parscale_ear_hf.ParScaleEARPipeline`.

    Returns:
        ``image_size``, ``image_channels``, ``token_grid`` ``[h, w, C]``, ``num_classes``,
        ``parameters`` (:func:`component_parameter_counts`) and each component's public ``configs``.
    """
    return {
        "image_size": pipe.grid_size * pipe.vae_scale_factor,
        "image_channels": pipe.vae.config.out_channels,
        "token_grid": [pipe.grid_size, pipe.grid_size, pipe.transformer.config.in_channels],
        "num_classes": pipe.transformer.config.num_classes,
        "parameters": component_parameter_counts(pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head),
        "configs": {
            name: {k: v for k, v in dict(getattr(pipe, name).config).items() if not k.startswith("_")}
            for name in ("vae", "lite_hybrid", "transformer", "energy_head")
        },
    }


def default_parameter_counts(parscale_ns: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Counts of the ImageNet-256 default configs, built on the meta device (no memory, no compute).

    Also the extra parameters of ParScale with P streams over the P=1 backbone (prefixes and the
    aggregation MLP).
    """
    with torch.device("meta"):
        counts = component_parameter_counts(LiteVAE(), LiteHybrid(), EARTransformer(), EnergyHead())
        base = counts["transformer"]
        parscale_extra = {str(p): count_parameters(EARTransformer(parscale_n=p)) - base for p in parscale_ns}
    return {"components": counts, "parscale_extra_parameters": parscale_extra}


def parameter_table(counts: dict[str, int]) -> str:
    """Markdown table of :func:`component_parameter_counts` for the default configs."""
    rows = ["| component | class | role and default shapes | parameters |", "|---|---|---|---:|"]
    for key, (cls, role) in COMPONENT_ROLES.items():
        rows.append(f"| `{key}` | `{cls}` | {role} | {counts[key] / 1e6:.2f}M |")
    rows.append(
        f"| generator total | | LiteHybrid + EARTransformer + EnergyHead | {counts['generator_total'] / 1e6:.2f}M |"
    )
    return "\n".join(rows)

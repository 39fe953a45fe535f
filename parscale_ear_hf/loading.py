"""Loading what a command names: a pipeline (ours or diffusers' DiT baseline) or a VAE, from a folder or a
Hub repo id."""

from __future__ import annotations

import os

from diffusers import AutoencoderKL, DiTPipeline

from .data import local_path
from .models.lite_vae import LiteVAE
from .pipeline_components import vae_spatial_factor
from .pipeline_parscale_ear import ParScaleEARPipeline

VAE_SOURCES = (
    "a folder written by `save_pretrained` (LiteVAE or AutoencoderKL), a pipeline folder with --vae-subfolder vae, "
    "or a Hub repo id ('org/name')"
)


def load_vae(path: str | os.PathLike, subfolder: str | None = None) -> LiteVAE | AutoencoderKL:
    """A `LiteVAE`, or a `diffusers.AutoencoderKL` when ``config.json`` names that class.

    Args:
        path: a folder written by ``save_pretrained``, a pipeline folder (with ``subfolder`` "vae"),
            or a Hub repo id (online, or offline from the Hugging Face cache).
        subfolder: the VAE's folder inside ``path``.

    Raises a FileNotFoundError for a local path or subfolder that does not exist or holds no
    config.json, and an OSError naming the repo id when the Hub (or its cache) does not have it.
    """
    path = os.fspath(path)
    local = local_path(path, owner="load_vae", name="--vae", accepted=VAE_SOURCES)
    if local is not None:
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            pipeline = not subfolder and (local / "model_index.json").is_file()
            hint = " (a pipeline folder: add --vae-subfolder vae)" if pipeline else ""
            raise FileNotFoundError(
                f"load_vae: {os.fspath(folder)!r} has no config.json{hint}. Accepted: {VAE_SOURCES}."
            )
        config = LiteVAE.load_config(path, subfolder=subfolder)
    else:
        try:
            config = LiteVAE.load_config(path, subfolder=subfolder)
        except OSError as error:
            where = f" (subfolder {subfolder!r})" if subfolder else ""
            raise OSError(
                f"load_vae: --vae={path!r} is not a local folder, and the Hub repo {path!r}{where} could not be read "
                f"({error}); check the id and the network, or, offline (HF_HUB_OFFLINE=1), that the Hugging Face "
                f"cache holds it. Accepted: {VAE_SOURCES}."
            ) from error
    cls = AutoencoderKL if config.get("_class_name") == "AutoencoderKL" else LiteVAE
    return cls.from_pretrained(path, subfolder=subfolder)


def load_pipeline(model: str, pipeline_class: str, device, compile: bool):
    """The pipeline on ``device``; with ``compile``, its sampling step under torch.compile. Returns the
    pipeline, its image size and the modules whose weights define its samples."""
    if pipeline_class == "DiTPipeline":
        pipe = DiTPipeline.from_pretrained(model).to(device)
        if compile:
            pipe.transformer.compile()  # in place: its state_dict keys are unchanged
        image_size = pipe.transformer.config.sample_size * vae_spatial_factor(pipe.vae)
        return pipe, image_size, (pipe.vae, pipe.transformer)
    pipe = ParScaleEARPipeline.from_pretrained(model).to(device)
    if compile:
        pipe.enable_compiled_step()
    return (
        pipe,
        pipe.grid_size * pipe.vae_scale_factor,
        (pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head),
    )

r"""Cache VAE posteriors once, so generator training never runs the VAE encoder.

    accelerate launch examples/cache_latents.py --vae outputs/vae_mnist/vae --dataset data/mnist_demo \
        --output-dir outputs/latents_mnist --no-hflip

Each process encodes its shard of the dataset and writes ``shard-<rank>`` (`save_to_disk`) with
the posterior moments (mean and log-variance, float32) and the label; with ``--hflip`` (the default)
also the moments of the horizontally flipped image, for flip augmentation as MAR and EAR do on
ImageNet (``--no-hflip`` for MNIST digits, which are not mirror-symmetric). Like MAR, training then
draws a fresh posterior sample each time (:func:`sample_latents`) instead of storing one fixed
sample. ``cache_info.json``, written last, records the VAE, its latent scale and the dataset; a
folder without it is incomplete.

The cache holds a copy of its VAE (``vae/``, written by ``save_pretrained``), so that training finds it from
any working directory, after the folder is moved (e.g. to a cluster's scratch disk), and on nodes without the
Hub: the copy costs the VAE's size (2.5 MB for the demo's, 335 MB for SD's KL-f8 in float32), next to
latents that are gigabytes for ImageNet. ``cache_info.json`` records the VAE as cache-latents was given it
(``vae``, provenance only), its copy (``vae_folder``) and :func:`vae_record` (class, config and weights
hash), against which a trainer's ``--vae`` is checked (:func:`load_cache_vae`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ..data import add_dataset_arguments, image_loader, load_dataset_from_args, shard_for_process
from ..loading import load_vae
from ..models._checks import check_int
from ..models.lite_vae import LiteVAE
from ..saving import weights_fingerprint

INFO_FILE = "cache_info.json"
VAE_FOLDER = "vae"  # the cache's copy of its VAE


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}"


def _cache_features(moments_shape: tuple[int, ...], label_feature, hflip: bool):
    import datasets

    features = {"moments": datasets.Array3D(shape=moments_shape, dtype="float32"), "label": label_feature}
    if hflip:
        features["moments_flip"] = datasets.Array3D(shape=moments_shape, dtype="float32")
    return datasets.Features(features)


@torch.no_grad()
def encode_to_cache(
    vae: LiteVAE | AutoencoderKL,
    dataset,
    output_dir: str | os.PathLike,
    *,
    image_size: int,
    channels: int,
    batch_size: int = 64,
    hflip: bool = False,
    rank: int = 0,
    world_size: int = 1,
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    allow_upsampling: bool = False,
) -> int:
    """Encode this process's shard of ``dataset`` and write it to ``output_dir/shard-<rank>``.

    Args:
        vae: encoder whose ``encode(x).latent_dist.parameters`` are the moments `(B, 2C, h, w)`.
        dataset: map-style or streamed dataset with "image" and "label" columns
            (:func:`~parscale_ear_hf.data.load_image_dataset`).
        image_size, channels: preprocessing (:func:`~parscale_ear_hf.data.image_transform`).
        hflip: also store "moments_flip", the moments of the horizontally flipped images.
        rank, world_size: which shard (:func:`~parscale_ear_hf.data.shard_for_process`).
        accelerator: when given, its device is used, the main process shows a progress bar, and
            the call returns only once every process has written its shard.

    Returns:
        The number of examples written by this process. Columns of the shard: "moments" and
        "moments_flip" (float32 `(2C, h, w)`: mean then log-variance along channels) and "label"
        (the source's label feature, e.g. its `ClassLabel`).
    """
    import datasets

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = accelerator.device if accelerator is not None else vae.device
    shard = shard_for_process(dataset, rank, world_size)
    loader = image_loader(
        shard, image_size, channels, batch_size=batch_size, num_workers=num_workers, allow_upsampling=allow_upsampling
    )
    progress = tqdm(
        total=len(shard) if isinstance(shard, datasets.Dataset) else None,
        desc=f"encode {shard_name(rank)}",
        unit="img",
        disable=accelerator is None or not accelerator.is_main_process,
    )
    examples = functools.partial(_encoded_examples, vae, loader, device, hflip, progress)
    # The moments' shape is fixed by the VAE; probe it with one blank image.
    probe = vae.encode(torch.zeros(1, channels, image_size, image_size, device=device)).latent_dist.parameters
    # Streamed sources may not declare features; their labels are plain integers.
    label_feature = dataset.features["label"] if dataset.features is not None else datasets.Value("int64")
    features = _cache_features(tuple(probe.shape[1:]), label_feature, hflip)
    try:
        count = _write_shard(examples, features, output_dir, shard_name(rank))
    finally:
        progress.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return count


def _encoded_examples(vae, loader, device, hflip: bool, progress):
    """The cache's examples, ``{"moments", "label"}`` (and ``"moments_flip"`` with ``hflip``), one image at a time
    from the batches of ``loader``; ``progress`` counts them."""
    for batch in loader:
        images = batch["pixel_values"].to(device)
        if hflip:
            images = torch.cat([images, images.flip(-1)])
        moments = vae.encode(images).latent_dist.parameters.float().cpu().numpy()
        count = len(batch["label"])
        for i, label in enumerate(batch["label"].tolist()):
            example = {"moments": moments[i], "label": label}
            if hflip:
                example["moments_flip"] = moments[count + i]
            yield example
        progress.update(count)


def _write_shard(examples, features, output_dir: Path, name: str) -> int:
    """Write the dataset of the generator function ``examples`` to ``output_dir/name``; returns its length.

    It is built in a private cache folder (never reused: a unique fingerprint, no hashing of the VAE), saved to a
    temporary name and renamed: a killed run leaves no half-written shard.
    """
    import datasets

    build_dir = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=output_dir))
    tmp, final = output_dir / f".tmp-{name}", output_dir / name
    try:
        written = datasets.Dataset.from_generator(
            examples, features=features, cache_dir=os.fspath(build_dir), fingerprint=uuid.uuid4().hex
        )
        shutil.rmtree(tmp, ignore_errors=True)
        written.save_to_disk(os.fspath(tmp))
        count = len(written)
        del written
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return count


def write_cache_info(output_dir: str | os.PathLike, num_shards: int, **info) -> dict:
    """Write ``cache_info.json`` once all ``num_shards`` shards are on disk; returns what was written.

    Adds "num_shards", "count" (examples over all shards), "latent_channels", "grid_size",
    "num_classes" and "id2label" (from the `ClassLabel` names, else the label ids) to ``info``,
    which should name the VAE ("vae", and "vae_folder" with :func:`vae_record` when the cache holds
    a copy) and its "scaling_factor" / "shift_factor", the dataset, split, image size and whether
    "hflip" moments are stored.
    """
    import datasets

    output_dir = Path(output_dir)
    shards = [datasets.load_from_disk(os.fspath(output_dir / shard_name(rank))) for rank in range(num_shards)]
    channels2, grid_size, _ = shards[0].features["moments"].shape
    label_feature = shards[0].features["label"]
    if isinstance(label_feature, datasets.ClassLabel):
        names = label_feature.names
    else:
        names = [str(i) for i in range(1 + max(max(shard["label"], default=-1) for shard in shards))]
    info = {
        **info,
        "num_shards": num_shards,
        "count": sum(len(shard) for shard in shards),
        "latent_channels": channels2 // 2,
        "grid_size": grid_size,
        "num_classes": len(names),
        "id2label": dict(enumerate(names)),
    }
    tmp = output_dir / f"{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / INFO_FILE)
    return json.loads(json.dumps(info))


def load_latent_cache(path: str | os.PathLike):
    """Open a cache written by :func:`encode_to_cache` + :func:`write_cache_info`.

    Returns:
        ``(dataset, info)``: the shards concatenated in rank order, formatted as torch tensors
        ("moments" `(2C, h, w)` float32, "label" int64, "moments_flip" when cached with hflip), and
        the ``cache_info.json`` dict (its "id2label" keys are strings, as JSON stores them).
    """
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_latent_cache: {os.fspath(path)!r} is not a folder; run cache_latents.py first.")
    if not (path / INFO_FILE).is_file():
        raise FileNotFoundError(
            f"load_latent_cache: {os.fspath(path)!r} has no {INFO_FILE}, so the cache is incomplete (still being "
            "written, or interrupted); run cache_latents.py again."
        )
    info = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
    missing = [shard_name(r) for r in range(info.get("num_shards", 0)) if not (path / shard_name(r)).is_dir()]
    if info.get("num_shards", 0) < 1 or missing:
        raise FileNotFoundError(
            f"load_latent_cache: {os.fspath(path)!r} lists {info.get('num_shards', 0)} shards in {INFO_FILE} but "
            f"lacks {missing or 'all'}; run cache_latents.py again."
        )
    shards = [datasets.load_from_disk(os.fspath(path / shard_name(r))) for r in range(info["num_shards"])]
    return datasets.concatenate_datasets(shards).with_format("torch"), info


def sample_latents(
    moments: torch.Tensor, scaling_factor: float, shift_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A posterior sample, scaled for the generator: ``(mean + std * eps - shift_factor) * scaling_factor``.

    Args:
        moments: `(B, 2C, h, w)`, mean then log-variance along channels (as cached).
        generator: for ``eps ~ N(0, I)``; on ``moments``' device.

    Returns:
        `(B, C, h, w)` latents.
    """
    mean, logvar = moments.chunk(2, dim=1)
    # The clamp matches diffusers' DiagonalGaussianDistribution.
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift_factor) * scaling_factor


def vae_record(vae: LiteVAE | AutoencoderKL) -> dict:
    """What ``cache_info.json`` records of the VAE that encoded the cache: "vae_class", "vae_config" (its config
    fields without a leading underscore, as JSON) and "vae_weights_sha256" (:func:`~.saving.weights_fingerprint`)."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    return {
        "vae_class": type(vae).__name__,
        "vae_config": json.loads(json.dumps(config)),
        "vae_weights_sha256": weights_fingerprint(vae),
    }


def _differences(info: dict, actual: dict) -> list[str]:
    """Where the :func:`vae_record` ``actual`` differs from what ``info`` recorded: "<what> <recorded> vs <actual>"."""
    differences = []
    if "vae_class" in info and info["vae_class"] != actual["vae_class"]:
        differences.append(f"class {info['vae_class']!r} vs {actual['vae_class']!r}")
    if "vae_config" in info:
        recorded, config = info["vae_config"], actual["vae_config"]
        differences += [
            f"config {field} {recorded.get(field)!r} vs {config.get(field)!r}"
            for field in sorted({*recorded, *config})
            if recorded.get(field) != config.get(field)
        ]
    if "vae_weights_sha256" in info and info["vae_weights_sha256"] != actual["vae_weights_sha256"]:
        differences.append(f"weights sha256 {info['vae_weights_sha256']} vs {actual['vae_weights_sha256']}")
    return differences


def load_cache_vae(
    owner: str, latents: str | os.PathLike, info: dict, vae: str | None = None
) -> LiteVAE | AutoencoderKL:
    """The VAE that encoded the latent cache at ``latents`` (``info``: its ``cache_info.json``), which decodes
    what is trained on it.

    Args:
        owner: the command, for messages (``train``, ``train-dit``).
        vae: a trainer's ``--vae`` (folder or Hub id), in place of the cache's VAE. It must match what the cache
            recorded of its VAE (:func:`vae_record`; caches written before caches kept a copy recorded only the
            class).

    Without ``vae``: the cache's copy ``<latents>/vae``. A cache written before caches kept a copy names its VAE
    only as cache-latents was given it (``info["vae"]``), a path that loads from the folder it was made in.

    Raises a FileNotFoundError naming what the cache recorded, and how to pass ``--vae``, when its VAE cannot be
    found; a ValueError naming each difference when ``vae`` is not the cache's VAE.
    """
    latents = Path(latents)
    copy = latents / info["vae_folder"] if "vae_folder" in info else None
    if vae is not None:
        model = load_vae(vae)
        differences = _differences(info, vae_record(model))
        if differences:
            instead = (
                f"leave --vae out to use the cache's copy {os.fspath(copy)!r}"
                if copy is not None
                else f"pass the VAE that cache-latents was given ({info['vae']!r})"
            )
            raise ValueError(
                f"{owner}: --vae {vae!r} is not the VAE that encoded the latent cache {os.fspath(latents)!r}; "
                f"the cache vs --vae: {'; '.join(differences)}. Accepted: the cache's VAE; {instead}, or write the "
                "cache again with cache-latents and this VAE."
            )
        return model
    if copy is not None:
        if not (copy / "config.json").is_file():
            raise FileNotFoundError(
                f"{owner}: the latent cache {os.fspath(latents)!r} lacks its copy of its VAE ({os.fspath(copy)!r} "
                f"has no config.json); cache-latents was given --vae {info['vae']!r}. Pass --vae with that VAE (it "
                "is checked against the class, config and weights the cache recorded), or write the cache again "
                "with cache-latents."
            )
        return load_vae(copy)
    try:
        return load_vae(info["vae"])
    except OSError as error:
        raise FileNotFoundError(
            f"{owner}: the latent cache {os.fspath(latents)!r} was written before caches kept a copy of their VAE "
            f"and records it only as cache-latents was given it, --vae {info['vae']!r}, which does not load from "
            f"the working directory {os.getcwd()!r} ({error}). Run from the folder the cache was made in, pass "
            "--vae with that VAE (a folder or Hub id), or write the cache again with cache-latents (it then keeps "
            "a copy)."
        ) from error


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of :func:`run`."""
    parser.add_argument("--vae", required=True, help="folder (or Hub id) of a LiteVAE or AutoencoderKL")
    parser.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a pipeline folder")
    add_dataset_arguments(parser, labels=True)
    parser.add_argument("--output-dir", required=True, help="the cache folder")
    parser.add_argument("--image-size", type=int, default=None, help="default: the VAE's sample_size")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encode call, per process")
    parser.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also cache horizontally flipped images, as MAR and EAR do on ImageNet (default); --no-hflip for "
        "data that is not mirror-symmetric, such as the MNIST demo's digits",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--cpu", action="store_true", help="encode on CPU even when a GPU is present")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Encode ``--dataset`` with ``--vae`` into ``--output-dir`` (`examples/cache_latents.py`,
    `parscale-ear cache-latents`); returns the cache info dict."""
    check_int("cache-latents", "--batch-size", args.batch_size, 1)
    check_int("cache-latents", "--num-workers", args.num_workers, 0)
    if args.image_size is not None:
        check_int("cache-latents", "--image-size", args.image_size, 1)
    # Without a GPU, accelerate joins a torchrun world (gloo) only when told cpu=True.
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    output_dir = Path(args.output_dir)
    vae = load_vae(args.vae, args.vae_subfolder).to(accelerator.device).eval()
    dataset = load_dataset_from_args(args, args.split)
    image_size = args.image_size or vae.config.sample_size
    if accelerator.is_main_process and (output_dir / INFO_FILE).exists():
        # Mark the folder incomplete until the new shards are all written.
        (output_dir / INFO_FILE).unlink()
    accelerator.wait_for_everyone()
    encode_to_cache(
        vae,
        dataset,
        output_dir,
        image_size=image_size,
        channels=vae.config.in_channels,
        batch_size=args.batch_size,
        hflip=args.hflip,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        accelerator=accelerator,
        num_workers=args.num_workers,
        allow_upsampling=args.allow_upsampling,
    )
    info = None
    if accelerator.is_main_process:
        shutil.rmtree(output_dir / VAE_FOLDER, ignore_errors=True)
        vae.save_pretrained(output_dir / VAE_FOLDER)
        info = write_cache_info(
            output_dir,
            accelerator.num_processes,
            vae=os.fspath(args.vae) if args.vae_subfolder is None else f"{args.vae}/{args.vae_subfolder}",
            vae_folder=VAE_FOLDER,
            **vae_record(vae),
            scaling_factor=vae.config.scaling_factor,
            shift_factor=vae.config.shift_factor or 0.0,
            dataset=os.fspath(args.dataset),
            split=args.split,
            image_size=image_size,
            hflip=args.hflip,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if info is None:
        return json.loads((output_dir / INFO_FILE).read_text(encoding="utf-8"))
    grid = info["grid_size"]
    print(f"cached {info['count']} examples, latents {info['latent_channels']}x{grid}x{grid} -> {args.output_dir}")
    return info

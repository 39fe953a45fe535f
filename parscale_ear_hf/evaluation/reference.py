"""Features of real images, and the reference statistics samples are compared with.

:func:`dataset_features` reads a `datasets` split in order, centre-cropped as ADM prepares ImageNet, optionally
through :func:`vae_round_trip` (reconstruction FID); :func:`subset_order` is the seeded order of a limited
number of images. A :class:`Reference` holds `mu`, `sigma` (pool3 for Inception), optionally `mu_s`, `sigma_s`
(the spatial features of sFID) and features, and where they came from (extractor, weights sha1, resize, image
size): :func:`load_reference` reads ADM's .npz or a cached one, :func:`reference_from_dataset` computes one and
caches it at :func:`reference_cache_path`. Every .npz is written atomically (:func:`_atomic_savez`).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import center_crop_arr, refuse_smaller
from .extractors import FeatureExtractor, to_uint8
from .metrics import feature_statistics


@dataclass
class Reference:
    """What samples are compared with: `mu` `(D,)`, `sigma` `(D, D)`, optionally `features` `(M, D)`
    for precision / recall and `mu_s` `(S,)`, `sigma_s` `(S, S)` of the spatial features (sFID), and
    where it came from (`source`, `extractor`, `image_size`, `count`, `weights_sha1`, `resize`). None
    means unknown: ADM's files record nothing, and their statistics are read as the FID Inception's."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str
    extractor: str | None
    image_size: int | None
    count: int | None
    weights_sha1: str | None = None
    resize: str | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def check_fits(self, extractor: FeatureExtractor, image_size: int) -> None:
        """Raise a ValueError when this reference cannot be compared with `extractor` features of
        `image_size` images: the checks run before any sampling."""
        d = extractor.feature_dim
        if self.mu.shape != (d,) or self.sigma.shape != (d, d):
            raise ValueError(
                f"reference {self.source}: mu {self.mu.shape} / sigma {self.sigma.shape} do not fit the extractor "
                f"{extractor.name!r}, whose features have {d} dimensions (need mu ({d},), sigma ({d}, {d}))."
            )
        if self.features is not None and (self.features.ndim != 2 or self.features.shape[1] != d):
            raise ValueError(f"reference {self.source}: features {self.features.shape} do not have {d} columns.")
        if self.extractor is not None and self.extractor != extractor.name:
            raise ValueError(
                f"reference {self.source} was made with the extractor {self.extractor!r}, but this run uses "
                f"{extractor.name!r}; make the reference with the run's extractor."
            )
        if self.image_size is not None and self.image_size != image_size:
            raise ValueError(
                f"reference {self.source} holds {self.image_size}x{self.image_size} images, but the model makes "
                f"{image_size}x{image_size} images; use a reference at the model's image size."
            )
        for what, theirs, ours in (
            ("weights sha1", self.weights_sha1, extractor.weights_sha1),
            ("resize", self.resize, extractor.resize),
        ):
            if theirs is not None and theirs != ours:
                raise ValueError(
                    f"reference {self.source} was made with the {what} {theirs!r}, but this run's extractor "
                    f"{extractor.name!r} has {ours!r}; make the reference with the run's extractor."
                )
        s = extractor.spatial_dim
        if self.mu_s is not None and s is not None and (self.mu_s.shape != (s,) or self.sigma_s.shape != (s, s)):
            raise ValueError(
                f"reference {self.source}: mu_s {self.mu_s.shape} / sigma_s {self.sigma_s.shape} do not fit the "
                f"extractor {extractor.name!r}, whose spatial features have {s} dimensions."
            )

    def save(self, path: str | os.PathLike) -> None:
        meta = {
            "source": self.source,
            "extractor": self.extractor,
            "image_size": self.image_size,
            "count": self.count,
            "weights_sha1": self.weights_sha1,
            "resize": self.resize,
            **self.meta,
        }
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(meta))}
        if self.features is not None:
            arrays["features"] = self.features
        if self.mu_s is not None:
            arrays["mu_s"], arrays["sigma_s"] = self.mu_s, self.sigma_s
        _atomic_savez(Path(path), **arrays)


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id in the name: two evaluations that share a reference cache may write it at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_reference(
    path: str | os.PathLike, extractor: FeatureExtractor | None = None, batch_size: int = 100
) -> Reference:
    """A reference .npz: ADM's (`mu`, `sigma` of pool3, `mu_s`, `sigma_s` of `mixed_6/conv`, and `arr_0`:
    reference images `(M, H, W, 3)` uint8, whose features are computed with `extractor` for precision /
    recall) or one written by :func:`reference_from_dataset` (the same statistics, `features`, `meta`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_reference: --reference {os.fspath(path)!r} is not a file; pass ADM's reference .npz (e.g. "
            "VIRTUAL_imagenet256_labeled.npz) or a file written by --reference-dataset."
        )
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"load_reference: {os.fspath(path)!r} is not a readable .npz file ({error}).") from error
    if not {"mu", "sigma"} <= keys:
        raise ValueError(
            f"load_reference: {os.fspath(path)!r} holds arrays {sorted(keys)}; a reference needs 'mu' and 'sigma' "
            "(and 'arr_0' images or 'features' for precision / recall)."
        )
    meta = json.loads(str(data["meta"])) if "meta" in keys else {}
    meta.setdefault("file", os.fspath(path))
    features = data["features"] if "features" in keys else None
    image_size = meta.get("image_size")
    if "arr_0" in keys:
        images = data["arr_0"]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"load_reference: 'arr_0' in {os.fspath(path)!r} has shape {images.shape} {images.dtype}; ADM's "
                "reference images are (M, H, W, 3) uint8."
            )
        image_size = images.shape[1]
        if extractor is not None:
            if extractor.feature_dim != np.asarray(data["mu"]).shape[-1]:
                raise ValueError(
                    f"load_reference: {os.fspath(path)!r} has {np.asarray(data['mu']).shape[-1]}-d statistics, but "
                    f"the extractor {extractor.name!r} makes {extractor.feature_dim}-d features."
                )
            extractor.check_images(images.shape[-1], image_size)
            features = np.concatenate(
                [
                    extractor(torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2)).features.numpy()
                    for i in range(0, len(images), batch_size)
                ]
            )
    spatial = {"mu_s", "sigma_s"} <= keys
    recorded = ("source", "extractor", "image_size", "count", "weights_sha1", "resize")
    return Reference(
        mu=np.asarray(data["mu"], np.float64),
        sigma=np.asarray(data["sigma"], np.float64),
        features=features,
        source=meta.get("source", os.fspath(path)),
        # ADM's files carry no metadata; their statistics are the FID Inception's pool3 / mixed_6 by convention.
        extractor=meta.get("extractor"),
        image_size=image_size,
        count=meta.get("count"),
        weights_sha1=meta.get("weights_sha1"),
        resize=meta.get("resize"),
        mu_s=np.asarray(data["mu_s"], np.float64) if spatial else None,
        sigma_s=np.asarray(data["sigma_s"], np.float64) if spatial else None,
        meta={k: v for k, v in meta.items() if k not in recorded},
    )


def dataset_features(
    dataset,
    *,
    image_size: int,
    channels: int,
    extractor: FeatureExtractor,
    max_images: int | None = None,
    batch_size: int = 100,
    transform=None,
    progress: bool = True,
    allow_upsampling: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features `(N, feature_dim)` and spatial features `(N, spatial_dim)` (None when the extractor has
    none) of the images of a `datasets` split, read in order, centre-cropped to `image_size` as ADM
    prepares ImageNet (:func:`~parscale_ear_hf.data.center_crop_arr`).

    Args:
        transform: applied to each uint8 batch `(B, C, H, W)` before the extractor (e.g. a VAE
            round trip, for reconstruction FID); returns uint8 images of the same shape.
        allow_upsampling: accept a first image smaller than `image_size` (refused otherwise, as
            :func:`~parscale_ear_hf.data.image_loader` does).
    """
    mode = {1: "L", 3: "RGB"}[channels]
    features, spatial, batch, seen = [], [], [], 0

    def flush():
        array = np.stack([np.asarray(center_crop_arr(im.convert(mode), image_size)) for im in batch])
        images = torch.from_numpy(array[..., None] if array.ndim == 3 else array).permute(0, 3, 1, 2)
        out = extractor(images if transform is None else transform(images))
        features.append(out.features.numpy())
        if out.spatial is not None:
            spatial.append(out.spatial.numpy())
        batch.clear()

    for example in tqdm(dataset, total=max_images, desc="dataset features", disable=not progress):
        if max_images is not None and seen >= max_images:
            break
        if seen == 0 and not allow_upsampling:
            name = getattr(example["image"], "filename", None) or "example 0"
            refuse_smaller("dataset_features", example["image"], image_size, repr(name))
        batch.append(example["image"])
        seen += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not features:
        return np.zeros((0, extractor.feature_dim), np.float32), None
    return np.concatenate(features), np.concatenate(spatial) if spatial else None


def subset_order(dataset):
    """The order in which a limited number of images is read: a seeded shuffle, since splits are
    often stored class by class (image folders, the MNIST demo) and a prefix would be unbalanced."""
    return dataset.shuffle(seed=0)


def reference_cache_path(cache_dir: str | os.PathLike, dataset: str, split: str, image_size: int, extractor) -> Path:
    """Where :func:`reference_from_dataset` caches its statistics: keyed by dataset, split, image size,
    extractor and its weights (sha1 prefix)."""

    def slug(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")

    name = f"ref-{slug(str(dataset))}-{slug(split)}-{image_size}px-{slug(extractor.name)}"
    return Path(cache_dir) / f"{name}-{extractor.weights_sha1[:12]}.npz"


def reference_from_dataset(
    dataset,
    *,
    dataset_name: str,
    split: str,
    image_size: int,
    channels: int,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike,
    max_images: int | None = None,
    batch_size: int = 100,
    progress: bool = True,
    allow_upsampling: bool = False,
) -> Reference:
    """Statistics of the images of a `datasets` split (map-style or streamed), centre-cropped to
    `image_size` as ADM prepares ImageNet (:func:`~parscale_ear_hf.data.center_crop_arr`), cached
    to :func:`reference_cache_path`; a second call with the same key reads the cache.

    `dataset` may be a callable returning the dataset, so a cache hit never opens it.
    """
    extractor.check_images(channels, image_size)
    path = reference_cache_path(cache_dir, dataset_name, split, image_size, extractor)
    if path.is_file():
        reference = load_reference(path)
        if reference.count is not None and max_images is not None and reference.count != max_images:
            raise ValueError(
                f"reference_from_dataset: the cache {os.fspath(path)!r} holds {reference.count} images but "
                f"--reference-max-images is {max_images}; delete the cache or use the same limit."
            )
        return reference
    if callable(dataset):
        dataset = dataset()
    if max_images is not None:
        dataset = subset_order(dataset)
    features, spatial = dataset_features(
        dataset, image_size=image_size, channels=channels, extractor=extractor, max_images=max_images,
        batch_size=batch_size, progress=progress, allow_upsampling=allow_upsampling,
    )  # fmt: skip
    if len(features) < 2:
        raise ValueError(f"reference_from_dataset: {dataset_name!r} split {split!r} gave {len(features)} images.")
    mu, sigma = feature_statistics(features)
    mu_s, sigma_s = (None, None) if spatial is None else feature_statistics(spatial)
    reference = Reference(
        mu=mu,
        sigma=sigma,
        features=features,
        source=f"{dataset_name} [{split}]",
        extractor=extractor.name,
        image_size=image_size,
        count=len(features),
        weights_sha1=extractor.weights_sha1,
        resize=extractor.resize,
        mu_s=mu_s,
        sigma_s=sigma_s,
        meta={
            "dataset": dataset_name,
            "split": split,
            "preprocessing": "center_crop_arr (ADM)",
            "subset": None if max_images is None else "the first max_images after shuffle(seed=0)",
        },
    )
    reference.save(path)
    return reference


def vae_round_trip(vae, device: str | torch.device = "cpu", batch_size: int = 100):
    """uint8 images `(B, C, H, W)` -> their reconstructions by `vae` (posterior mode, then decode),
    uint8, for reconstruction FID (rFID): `transform` of :func:`dataset_features`."""

    @torch.no_grad()
    def transform(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, torch.float32) / 127.5 - 1
        latents = vae.encode(x).latent_dist.mode()
        return to_uint8((vae.decode(latents).sample + 1) / 2).cpu()

    vae.to(device).eval()
    return transform

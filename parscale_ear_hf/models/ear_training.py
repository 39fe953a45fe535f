"""The training-time forward of ParScale-EAR (the method): masking, label dropout and the energy loss."""

from __future__ import annotations

import torch
import torch.nn as nn

from .ear_transformer import EARTransformer, latents_to_tokens
from .energy_head import EnergyHead
from .lite_hybrid import LiteHybrid


class EARTrainingModel(nn.Module):
    """LiteHybrid + EARTransformer + EnergyHead as one module, so `accelerate` / DDP can wrap it.

    Args:
        lite_hybrid, transformer, energy_head: the trainable pipeline components.
        num_head_samples: head samples per target in the energy score (EAR: 2 per estimate).
        energy_alpha: exponent of the energy score (EAR: 1; below 1 collapses, 2 is not proper).
        energy_lambda: weight of the repulsive term (EAR: 1, then 0.99 for the last epochs).
    """

    def __init__(
        self,
        lite_hybrid: LiteHybrid,
        transformer: EARTransformer,
        energy_head: EnergyHead,
        num_head_samples: int = 2,
        energy_alpha: float = 1.0,
        energy_lambda: float = 1.0,
    ):
        super().__init__()
        self.lite_hybrid = lite_hybrid
        self.transformer = transformer
        self.energy_head = energy_head
        self.num_head_samples = num_head_samples
        self.energy_alpha = energy_alpha
        self.energy_lambda = energy_lambda

    def forward(
        self, latents: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Energy loss of one batch.

        Args:
            latents: `(B, C, h, w)` scaled VAE latents (``scaling_factor * (z - shift_factor)``).
            class_labels: `(B,)` long in [0, num_classes).
            generator: CPU generator for the mask, label dropout and head noise (reproducible runs).

        Returns:
            Scalar loss, averaged over the masked tokens.
        """
        num_classes = self.transformer.config.num_classes
        if class_labels.min() < 0 or class_labels.max() >= num_classes:
            raise ValueError(
                f"EARTrainingModel: class labels must be in [0, {num_classes - 1}], got values in "
                f"[{int(class_labels.min())}, {int(class_labels.max())}]."
            )
        tokens = latents_to_tokens(latents)
        mask = self.transformer.sample_mask(tokens.shape[0], generator)
        labels = self.transformer.drop_labels(class_labels, generator)
        hidden = self.transformer(self.lite_hybrid(tokens, mask), labels, mask)
        return self.energy_head.loss(
            hidden[mask],
            tokens[mask],
            num_samples=self.num_head_samples,
            alpha=self.energy_alpha,
            lambda_=self.energy_lambda,
            generator=generator,
        )

"""The training-time forward of ParScale-EAR (the method): masking, label dropout and the energy loss."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._checks import check_int
from .diffusion_head import DiffusionHead
from .ear_transformer import EARTransformer, latents_to_tokens
from .energy_head import EnergyHead
from .lite_hybrid import LiteHybrid


class EARTrainingModel(nn.Module):
    """LiteHybrid + EARTransformer + EnergyHead as one module, so `accelerate` / DDP can wrap it.

    The head may be MAR's :class:`DiffusionHead` instead (the baseline of the head comparison): it is
    trained with its epsilon-prediction loss, `diffusion_batch_mul` timesteps per masked target.

    Args:
        lite_hybrid, transformer, energy_head: the trainable pipeline components.
        score_batch_mul: copies of each masked target in the energy score, each scored with two
            head samples (EAR's `--score_batch_mul`: 1 by default in `main_ear.py`, 2 in its recipe).
        energy_alpha: exponent of the energy score (EAR: 1; below 1 collapses, 2 is not proper).
        energy_lambda: weight of the repulsive term (EAR: 1, then 0.99 for the last epochs).
        diffusion_batch_mul: timesteps per target when the head is a DiffusionHead (MAR: 4).
    """

    def __init__(
        self,
        lite_hybrid: LiteHybrid,
        transformer: EARTransformer,
        energy_head: EnergyHead | DiffusionHead,
        score_batch_mul: int = 1,
        energy_alpha: float = 1.0,
        energy_lambda: float = 1.0,
        diffusion_batch_mul: int = 4,
    ):
        super().__init__()
        check_int("EARTrainingModel", "score_batch_mul", score_batch_mul)
        check_int("EARTrainingModel", "diffusion_batch_mul", diffusion_batch_mul)
        self.lite_hybrid = lite_hybrid
        self.transformer = transformer
        self.energy_head = energy_head
        self.score_batch_mul = score_batch_mul
        self.energy_alpha = energy_alpha
        self.energy_lambda = energy_lambda
        self.diffusion_batch_mul = diffusion_batch_mul

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every backbone and head block in the backward pass instead of keeping its activations
        (EAR's ``--grad_checkpointing``): the same loss and gradients for much less activation memory."""
        self.transformer.enable_gradient_checkpointing()
        self.energy_head.enable_gradient_checkpointing()

    def forward(
        self, latents: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Energy loss of one batch (a DiffusionHead's loss when the head is one).

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
        if isinstance(self.energy_head, DiffusionHead):
            hidden = self.transformer(self.lite_hybrid(tokens, mask), labels, mask)
            return self.energy_head.loss(
                hidden[mask], tokens[mask], num_samples=self.diffusion_batch_mul, generator=generator
            )
        return self.energy_loss(tokens, labels, mask, generator=generator)

    def energy_loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Energy loss for a given mask and given labels (after dropout): EAR's ``forward_loss``.

        Args:
            tokens: `(B, N, C)` scaled latent tokens.
            labels: `(B,)` long in [0, num_classes]; `num_classes` is the null class.
            mask: `(B, N)` bool, True at the tokens to predict.
            generator: draws the head noise when ``noise`` is None.
            noise: optional `(2 * score_batch_mul * M, noise_dim)` head noise for the M masked
                tokens (in `(B, N)` raster order), see :meth:`EnergyHead.loss`.

        Returns:
            Scalar loss, averaged over the masked tokens and their copies.
        """
        hidden = self.transformer(self.lite_hybrid(tokens, mask), labels, mask)
        return self.energy_head.loss(
            hidden[mask],
            tokens[mask],
            score_batch_mul=self.score_batch_mul,
            alpha=self.energy_alpha,
            lambda_=self.energy_lambda,
            generator=generator,
            noise=noise,
        )

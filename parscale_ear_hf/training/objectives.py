"""The training objectives, each a module whose ``forward`` returns the loss, so that `accelerate` / DDP wraps a
plain ``forward``: :class:`EARTrainingModel` (ParScale-EAR, the method: masking, label dropout, the energy loss),
:class:`DiTTrainingModel` (the DiT baseline's epsilon-prediction MSE) and :class:`VAETrainingModel` (LiteVAE's
L1 + KL + wavelet high-frequency loss).

The trainers (``generator``, ``dit``, ``vae``) build them; none is a saved pipeline component.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from ..models._checks import check_int
from ..models.diffusion_head import DiffusionHead
from ..models.ear_transformer import EARTransformer, latents_to_tokens
from ..models.energy_head import EnergyHead
from ..models.lite_hybrid import LiteHybrid
from ..models.lite_vae import LiteVAE, haar_dwt

# DiT's diffusion: linear betas over 1000 steps, epsilon prediction (Peebles & Xie; ADM's schedule).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
)


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


class DiTTrainingModel(nn.Module):
    """DiT's training loss around a ``DiTTransformer2DModel`` (the trainer's ``NullClassDiTTransformer2DModel``).

    Labels are dropped once per example here, from the caller's generator. diffusers' transformer has
    a label table in every block, and in training mode each would drop labels on its own (from the
    global generator); those tables are kept in eval mode, so every block sees the same label.
    """

    def __init__(self, transformer: DiTTransformer2DModel, class_dropout_prob: float = 0.1):
        super().__init__()
        self.transformer = transformer
        self.noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
        self.class_dropout_prob = class_dropout_prob

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.transformer.modules():
            if isinstance(module, LabelEmbedding):
                module.eval()
        return self

    def forward(self, latents: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The epsilon-prediction MSE of a batch.

        Args:
            latents: `(B, C, h, w)`, scaled as ``training.dit.LATENT_SCALING`` says.
            labels: `(B,)` class ids in ``[0, num_embeds_ada_norm)``.
            generator: a CPU generator for the timesteps, the noise and the label dropout.
        """
        batch, device = latents.shape[0], latents.device
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
        drop = (torch.rand(batch, generator=generator) < self.class_dropout_prob).to(device)
        labels = torch.where(drop, self.transformer.config.num_embeds_ada_norm, labels)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = self.transformer(noisy, timestep=timesteps, class_labels=labels).sample
        return F.mse_loss(prediction.float(), noise.float())


def wavelet_highfreq_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance between the high-frequency Haar bands (LH, HL, HH) of two image batches.

    Pixel L1 is dominated by smooth regions; this term weighs edges and texture on their own,
    as LiteVAE's wavelet loss does. Zero for identical images, positive when detail is lost.

    Args:
        reconstruction, target: `(B, C, H, W)` with even `H` and `W`.

    Returns:
        Scalar, the mean over the `3 * C` high bands at `(H / 2, W / 2)`.
    """
    channels = target.shape[1]
    return F.l1_loss(haar_dwt(reconstruction)[:, channels:], haar_dwt(target)[:, channels:])


class VAETrainingModel(nn.Module):
    """A LiteVAE and its training loss as one module, so `accelerate` / DDP wraps a plain ``forward``.

    Args:
        vae: the model being trained.
        kl_weight: weight of the KL term (element mean over latent elements).
        wavelet_weight: weight of :func:`wavelet_highfreq_loss`.
    """

    def __init__(self, vae: LiteVAE, kl_weight: float, wavelet_weight: float):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.wavelet_weight = wavelet_weight

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        Args:
            images: `(B, C, H, W)` in [-1, 1].
            noise: `(B, latent_channels, H / 2**levels, W / 2**levels)` standard normal; the posterior
                sample is ``mean + std * noise``. Passed in, so the caller decides the random stream.

        Returns:
            Dict of scalars: "loss" (the weighted sum that is optimised), "l1", "kl", "wavelet".
        """
        posterior = self.vae.encode(images).latent_dist
        reconstruction = self.vae.decode(posterior.mean + posterior.std * noise).sample
        l1 = F.l1_loss(reconstruction, images)
        # KL(q(z|x) || N(0, I)), averaged over latent elements.
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        wavelet = wavelet_highfreq_loss(reconstruction, images)
        loss = l1 + self.kl_weight * kl + self.wavelet_weight * wavelet
        return {"loss": loss, "l1": l1, "kl": kl, "wavelet": wavelet}

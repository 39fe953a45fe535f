"""EAR's energy head: a one-step token sampler, and the energy score that trains it.

Shao et al., "Continuous Visual Autoregressive Generation via Score Maximization" (ICML 2025).
The backbone's hidden vector ``z`` of a token position becomes the head's residual stream; a
uniform noise vector is the only AdaLN condition of every block, so one forward pass turns
``(z, noise)`` into one sample of the token's continuous distribution.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_bool, check_float, check_int


def energy_score_loss(
    samples: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    lambda_: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative energy score of two model samples against the target (lower is better).

    ``||x1-y||^a + ||x2-y||^a - lambda * ||x1-x2||^a``, written as EAR's ``-score`` with
    ``score = lambda * ||x1-x2||^a - ||x1-y||^a - ||x2-y||^a``. With ``0 < alpha < 2`` and
    ``lambda = 1`` it is a strictly proper scoring rule: its expectation is minimal when the
    samples follow the target distribution.

    Args:
        samples: `(2, M, C)`, two independent samples for each of M targets.
        target: `(M, C)`.
        alpha: exponent of the distance, in (0, 2).
        lambda_: weight of the repulsive (diversity) term; EAR uses 1, then 0.99 late in training.
        weight: optional `(M,)` weights (e.g. the mask of predicted tokens); the loss is their
            weighted mean.

    Returns:
        The scalar loss.
    """
    if samples.dim() != 3 or samples.shape[0] != 2 or samples.shape[1:] != target.shape:
        raise ValueError(
            f"energy_score_loss: expected samples (2, M, C) matching target (M, C), "
            f"got samples {tuple(samples.shape)} and target {tuple(target.shape)}."
        )
    sample_1, sample_2 = samples

    def distance(a, b):
        # float32 whatever the samples' dtype: CPU autocast leaves the norms of bf16 samples in bf16, which rounds
        # each distance to 2^-8 of itself, and the score is a difference of such distances.
        return (a.float() - b.float()).norm(dim=-1).pow(alpha)

    score = lambda_ * distance(sample_1, sample_2) - distance(sample_1, target) - distance(sample_2, target)
    if weight is None:
        return -score.mean()
    return -(score * weight).sum() / weight.sum().clamp_min(1.0)


class _AdaLNBlock(nn.Module):
    """Residual MLP block whose LayerNorm is modulated (shift, scale, gate) by the noise embedding."""

    def __init__(self, width: int, mlp_ratio: float, norm_affine: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm = nn.LayerNorm(width, elementwise_affine=norm_affine, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        # A zero gate makes each block start as the identity, the usual AdaLN-Zero choice (the
        # DiffusionHead's init; the EnergyHead re-initialises all of its layers as EAR does).
        nn.init.zeros_(self.modulation[1].weight[2 * width :])
        nn.init.zeros_(self.modulation[1].bias[2 * width :])

    def forward(self, x: torch.Tensor, cond: torch.Tensor, temperature: float) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        h = self.norm(x) * (1 + scale) + temperature * shift
        return x + gate * self.mlp(h)


class EnergyHead(AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""EAR's one-step head: ``(z, noise) -> token``.

    With the defaults it is the authors' ``SimpleMLPAdaLN`` (shaochenze/EAR, ``scoreloss.py``),
    including its initialisation: xavier Linear weights, and zeros on every AdaLN modulation and
    on the output layer, so a fresh head outputs exactly 0.

    Args:
        condition_dim: width of the backbone's hidden vector ``z`` (the transformer's `hidden_size`).
        token_channels: channels C of one VAE token (the VAE's `latent_channels`).
        width: width of the head's residual stream.
        depth: number of AdaLN residual MLP blocks.
        noise_dim: dimension of the uniform noise ``U[-0.5, 0.5]^noise_dim`` (EAR: 64).
        mlp_ratio: hidden width of each block's MLP relative to `width`.
        block_norm_affine: whether each block's LayerNorm has a weight and bias (EAR: True). The
            shipped demo models were trained with False.
        temperature_scales_final_layer: whether the inference temperature also scales the final
            layer's AdaLN shift. EAR scales only the blocks' shifts (False); the shipped demo
            models were trained with True.

    In training, ``enable_gradient_checkpointing()`` recomputes each block in the backward pass, as
    EAR's ``--grad_checkpointing`` does for its head.
    """

    _supports_gradient_checkpointing = True
    # Guidance is applied before the head, on the hidden states (EAR); MAR's DiffusionHead applies it itself.
    guidance_in_head = False

    @register_to_config
    def __init__(
        self,
        condition_dim: int = 768,
        token_channels: int = 32,
        width: int = 1024,
        depth: int = 6,
        noise_dim: int = 64,
        mlp_ratio: float = 1.0,
        block_norm_affine: bool = True,
        temperature_scales_final_layer: bool = False,
    ):
        super().__init__()
        for name in ("condition_dim", "token_channels", "width", "depth", "noise_dim"):
            check_int("EnergyHead", name, locals()[name])
        check_float("EnergyHead", "mlp_ratio", mlp_ratio, 1e-3, 64.0)
        check_bool("EnergyHead", "block_norm_affine", block_norm_affine)
        check_bool("EnergyHead", "temperature_scales_final_layer", temperature_scales_final_layer)
        self.gradient_checkpointing = False
        self.z_proj = nn.Linear(condition_dim, width)
        self.noise_embed = nn.Linear(noise_dim, width)
        self.blocks = nn.ModuleList([_AdaLNBlock(width, mlp_ratio, block_norm_affine) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # AdaLN-Zero: every block starts as the identity, and the head's first output is 0.
        for layer in [block.modulation[1] for block in self.blocks] + [self.final_modulation[1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def noise_shape(self) -> tuple[int]:
        """Noise per token: one vector of `noise_dim` (the pipeline draws it per image, up front)."""
        return (self.config.noise_dim,)

    @staticmethod
    def noise_from_uniform(u: torch.Tensor) -> torch.Tensor:
        """``U[0, 1)`` -> the head's noise ``U[-0.5, 0.5)``."""
        return u - 0.5

    def draw_noise(self, num: int, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
        """Noise ``U[-0.5, 0.5]^noise_dim`` for ``num`` tokens, `(num, noise_dim)`."""
        device = device if device is not None else self.device
        dtype = dtype if dtype is not None else self.dtype
        noise = torch.rand(
            num, self.config.noise_dim, generator=generator, device=generator.device if generator else device
        )
        return self.noise_from_uniform(noise).to(device=device, dtype=dtype)

    def forward(self, z: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """One sample per row.

        Args:
            z: `(M, condition_dim)` backbone hidden vectors.
            noise: `(M, noise_dim)` uniform noise, e.g. from :meth:`draw_noise`.
            temperature: EAR's inference temperature (0.7); 1.0 in training. It multiplies only
                the blocks' AdaLN shifts (and the final layer's, with
                `temperature_scales_final_layer`).

        Returns:
            `(M, token_channels)` tokens.
        """
        x = self.z_proj(z)
        cond = self.noise_embed(noise)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, temperature)
            else:
                x = block(x, cond, temperature)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        if self.config.temperature_scales_final_layer:
            shift = temperature * shift
        x = self.final_norm(x) * (1 + scale) + shift
        return self.out(x)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw one token per row of ``z`` `(M, condition_dim)` in one forward; returns `(M, token_channels)`."""
        if noise is None:
            noise = self.draw_noise(z.shape[0], generator, device=z.device, dtype=z.dtype)
        return self(z, noise.to(z.dtype), temperature)  # the pipeline draws the noise in float32 for any dtype

    def loss(
        self,
        z: torch.Tensor,
        target: torch.Tensor,
        score_batch_mul: int = 1,
        alpha: float = 1.0,
        lambda_: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """EAR's energy-score training loss for targets `(M, C)` given hidden vectors `(M, condition_dim)`.

        As the authors' ``ScoreLoss``: targets and ``z`` are repeated ``score_batch_mul`` times,
        each copy gets two head samples (one batched forward), and :func:`energy_score_loss`
        averages over all copies.

        Args:
            noise: optional `(2 * score_batch_mul * M, noise_dim)` head noise, rows ordered
                (sample, copy, target) as the authors draw it; drawn from ``generator`` if None.
        """
        rows = score_batch_mul * z.shape[0]
        if noise is None:
            noise = self.draw_noise(2 * rows, generator, device=z.device, dtype=z.dtype)
        samples = self(z.repeat(2 * score_batch_mul, 1), noise).view(2, rows, -1)
        return energy_score_loss(samples, target.repeat(score_batch_mul, 1), alpha=alpha, lambda_=lambda_)

"""MAR's diffusion head: the token sampler EAR's energy head replaces, kept as the speed baseline.

Li et al., "Autoregressive Image Generation without Vector Quantization" (NeurIPS 2024). The noisy
token ``x_t`` is the residual stream; the backbone's hidden vector ``z`` (projected) plus a
timestep embedding is the AdaLN condition of every block; the head predicts the noise (epsilon).
Training: cosine schedule, 1000 steps, MSE on epsilon with several timesteps per token. Sampling:
ancestral DDPM over a respaced schedule, `num_sampling_steps` forward passes per token (MAR: 100),
temperature scaling the injected noise. It has :class:`~parscale_ear_hf.models.energy_head.EnergyHead`'s
interface (`noise_shape`, `noise_from_uniform`, `sample`, `loss`), so the pipeline can use either.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_float, check_int
from .energy_head import _AdaLNBlock

TIME_FREQUENCY_DIM = 256  # sinusoidal features of the timestep, as in DiT / MAR


class DiffusionHead(AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""MAR's head: ``(x_t, t, z) -> epsilon``, sampled by `num_sampling_steps` DDPM steps.

    Args:
        condition_dim: width of the backbone's hidden vector ``z``.
        token_channels: channels C of one VAE token.
        width: width of the residual stream.
        depth: number of AdaLN residual MLP blocks.
        num_train_timesteps: diffusion steps of the training schedule (MAR: 1000, cosine).
        num_sampling_steps: respaced steps at sampling (MAR: 100); one forward pass each.
        mlp_ratio: hidden width of each block's MLP relative to `width`.

    In training, ``enable_gradient_checkpointing()`` recomputes each block in the backward pass (MAR's
    ``--grad_checkpointing``).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        condition_dim: int = 768,
        token_channels: int = 32,
        width: int = 1024,
        depth: int = 6,
        num_train_timesteps: int = 1000,
        num_sampling_steps: int = 100,
        mlp_ratio: float = 1.0,
    ):
        super().__init__()
        for name in ("condition_dim", "token_channels", "width", "depth", "num_train_timesteps"):
            check_int("DiffusionHead", name, locals()[name])
        check_int("DiffusionHead", "num_sampling_steps", num_sampling_steps, 1, num_train_timesteps)
        check_float("DiffusionHead", "mlp_ratio", mlp_ratio, 1e-3, 64.0)
        self.gradient_checkpointing = False
        self.input_proj = nn.Linear(token_channels, width)
        self.time_proj = Timesteps(TIME_FREQUENCY_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(TIME_FREQUENCY_DIM, width)
        self.cond_proj = nn.Linear(condition_dim, width)
        self.blocks = nn.ModuleList([_AdaLNBlock(width, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_channels)
        # DDIM with eta = 1 is ancestral DDPM on the respaced schedule, and takes the noise from us,
        # so each token's randomness can come from its own image's generator.
        self.scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=False,
            set_alpha_to_one=True,
            # "leading" with offset 1 starts at t = 981 (of 1000), where the cosine schedule keeps
            # alpha_bar ~ 1e-3: from t = 999 (alpha_bar ~ 2e-9) the x0 estimate multiplies any epsilon
            # error by ~600 and an imperfect head diverges.
            timestep_spacing="leading",
            steps_offset=1,
            prediction_type="epsilon",
        )

    @property
    def noise_shape(self) -> tuple[int, int]:
        """Noise per token: the starting ``x_T`` and one injection per step, `(num_sampling_steps + 1, C)`."""
        return (self.config.num_sampling_steps + 1, self.config.token_channels)

    @staticmethod
    def noise_from_uniform(u: torch.Tensor) -> torch.Tensor:
        """``U[0, 1)`` -> standard normal (inverse CDF), so the pipeline draws every head's noise alike."""
        u = u.clamp(1e-7, 1 - 1e-7)
        return torch.special.erfinv(2 * u - 1) * 2**0.5

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Predicted noise.

        Args:
            x_t: `(M, C)` noisy tokens.
            timesteps: `(M,)` or a scalar, in [0, num_train_timesteps).
            z: `(M, condition_dim)` backbone hidden vectors.

        Returns:
            `(M, C)` epsilon.
        """
        timesteps = torch.as_tensor(timesteps, device=x_t.device).expand(x_t.shape[0])
        cond = self.time_embed(self.time_proj(timesteps).to(x_t.dtype)) + self.cond_proj(z)
        x = self.input_proj(x_t)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, 1.0)
            else:
                x = block(x, cond, 1.0)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        return self.out(self.final_norm(x) * (1 + scale) + shift)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw one token per row of ``z`` `(M, condition_dim)` with `num_sampling_steps` DDPM steps.

        Args:
            temperature: scales the noise injected at every step (MAR's temperature).
            noise: `(M, *noise_shape)` standard normal; drawn from `generator` when None.

        Returns:
            `(M, token_channels)` tokens.
        """
        if noise is None:
            noise = torch.randn(
                z.shape[0], *self.noise_shape, generator=generator, device=generator.device if generator else z.device
            ).to(z.device)
        self.scheduler.set_timesteps(self.config.num_sampling_steps, device=z.device)
        # The chain x_T -> x_0 stays in float32 whatever the head's dtype: each step divides by sqrt(alpha_bar_t)
        # (down to ~0.03) and the state would be rounded at every one of the steps (bf16: 14x the error at 100).
        noise = noise.float()
        x = noise[:, 0]
        for i, t in enumerate(self.scheduler.timesteps):
            eps = self(x.to(z.dtype), t, z).float()
            x = self.scheduler.step(eps, t, x, eta=1.0, variance_noise=noise[:, i + 1] * temperature).prev_sample
        return x.to(z.dtype)

    def loss(
        self,
        z: torch.Tensor,
        target: torch.Tensor,
        num_samples: int = 4,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Epsilon-prediction MSE for targets `(M, C)` given hidden vectors `(M, condition_dim)`,
        with `num_samples` random timesteps per target (MAR: 4); `weight` `(M,)` as in the energy loss."""
        m = z.shape[0]
        device = generator.device if generator else z.device
        t = torch.randint(0, self.config.num_train_timesteps, (num_samples * m,), generator=generator, device=device)
        eps = torch.randn(num_samples * m, target.shape[1], generator=generator, device=device).to(z.device, z.dtype)
        t = t.to(z.device)
        x_t = self.scheduler.add_noise(target.repeat(num_samples, 1), eps, t)
        per_target = F.mse_loss(self(x_t, t, z.repeat(num_samples, 1)), eps, reduction="none").mean(dim=1)
        per_target = per_target.view(num_samples, m).mean(dim=0)
        if weight is None:
            return per_target.mean()
        return (per_target * weight).sum() / weight.sum().clamp_min(1.0)

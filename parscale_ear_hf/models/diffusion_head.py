"""MAR's diffusion head and its sampler: the token sampler EAR's energy head replaces.

Li et al., "Autoregressive Image Generation without Vector Quantization" (NeurIPS 2024), LTH14/mar
`models/diffloss.py` with the diffusion code it takes from DiT / improved-diffusion. The noisy token
``x_t`` is the residual stream; ``proj(z)`` plus a timestep embedding is the AdaLN condition of every
block; the head outputs ``2C`` channels: the noise ``eps`` and, in [-1, 1], where the variance lies between
the posterior's and ``beta_t`` (learned sigma). Training: cosine schedule over 1000 steps, MSE on ``eps``
plus the variational bound (in bits) for the variance, several timesteps per token. Sampling: ancestral
steps on MAR's respacing of the schedule (100 steps), guidance on ``eps`` at every step, temperature on the
injected noise.

Why no diffusers scheduler: ``DDPMScheduler(variance_type="learned_range")`` with the respaced timesteps
has the same formulas, but (1) its ``step`` draws the noise itself from a generator: it takes neither given
noise (the pipeline draws each image's noise up front) nor MAR's temperature on it; (2) it keeps its tables
in float32 (``trained_betas`` become float32 and their product is taken in float32), where MAR computes
them in float64 and rounds each once (our tables equal MAR's bit for bit; diffusers' ``alpha_bar`` differs by
up to 1.3e-5 relative, 200 float32 roundings); (3) it forms ``x_0`` as ``(x - sqrt(1 - a) eps) / sqrt(a)``, MAR as
``sqrt(1 / a) x - sqrt(1 / a - 1) eps``. So the sampler is written here once, as MAR's ``p_sample``.

The approximate head this file held before (DDIM with eta = 1 from t = 981, fixed variance, epsilon
MSE only, C outputs; the file as of commit 53592dd) trained and sampled the evidence grid's
``diffusion_head`` cell (results/experiments/diffusion_head/seed*.json: trained at 5ebf8fb and 77dba09,
sampling retimed at 723f27e, all with that file). Those results keep that provenance; this head is not
theirs, and their saved weights (C outputs) do not load into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_float, check_int
from .energy_head import _AdaLNBlock

TIME_FREQUENCY_DIM = 256  # sinusoidal features of the timestep, as in DiT / MAR
MAX_BETA = 0.999  # the cosine schedule's clip of each beta (improved DDPM)
LOG2 = math.log(2.0)


def cosine_betas(num_steps: int) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal): ``beta_i = 1 - abar((i+1)/T) / abar(i/T)``, at most 0.999, float64."""

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), MAX_BETA) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def respaced_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The training steps MAR's ``space_timesteps(T, str(num_steps))`` keeps: `num_steps` evenly spread over
    [0, T - 1] by a float stride ``(T - 1) / (num_steps - 1)`` accumulated and rounded (half to even) each time."""
    stride = 1.0 if num_steps <= 1 else (num_train_timesteps - 1) / (num_steps - 1)
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return sorted(set(kept))


class DiffusionSchedule:
    """A Gaussian diffusion over the kept steps of a base schedule: MAR's ``SpacedDiffusion`` tables.

    The betas of the kept steps are recomputed from the base ``alpha_bar`` (``1 - abar_t / abar_prev``), every
    table is computed in float64 and rounded once to float32, as MAR's `_extract_into_tensor` does. Index
    ``t`` is a kept step's rank; ``timestep_map[t]`` is the training step the network is told.
    """

    def __init__(self, base_betas: torch.Tensor, kept: list[int]):
        base_alpha_bar = torch.cumprod(1 - base_betas, dim=0)
        previous, betas = 1.0, []
        for step in kept:
            betas.append(1 - base_alpha_bar[step].item() / previous)
            previous = base_alpha_bar[step].item()
        betas = torch.tensor(betas, dtype=torch.float64)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        # The posterior variance is 0 at t = 0: its log takes t = 1's value there.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(kept) > 1 else posterior_variance
        tables = {
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar),
            "posterior_log_variance": clipped.log(),
            "log_beta": betas.log(),
        }
        self.tables = {name: table.float() for name, table in tables.items()}
        self.timestep_map = torch.tensor(kept)
        self.num_steps = len(kept)

    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Table `name` at steps ``t`` `(R,)` as `(R, 1)` float32 on ``t``'s device."""
        return self.tables[name].to(t.device)[t].unsqueeze(-1)

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``."""
        return self.at("sqrt_alpha_bar", t) * x_0 + self.at("sqrt_one_minus_alpha_bar", t) * noise

    def posterior_mean(self, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)``."""
        return self.at("posterior_mean_coef1", t) * x_0 + self.at("posterior_mean_coef2", t) * x_t

    def p_mean_log_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The model's ``p(x_{t-1} | x_t)`` from the head's output `(R, 2C)`: its mean and log variance `(R, C)`.

        The variance half ``v`` in [-1, 1] interpolates the log variance between the posterior's (-1)
        and ``log beta_t`` (+1), MAR's ``LEARNED_RANGE``.
        """
        eps, v = out.float().chunk(2, dim=-1)
        x_0 = self.at("sqrt_recip_alpha_bar", t) * x_t - self.at("sqrt_recipm1_alpha_bar", t) * eps
        frac = (v + 1) / 2
        log_variance = frac * self.at("log_beta", t) + (1 - frac) * self.at("posterior_log_variance", t)
        return self.posterior_mean(x_0, x_t, t), log_variance

    def vlb_bits(self, out: torch.Tensor, x_0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The variational-bound term per row `(R,)` in bits: ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``,
        and at t = 0 the discretized Gaussian decoder's negative log-likelihood (improved DDPM's ``L_vlb``)."""
        mean, log_variance = self.p_mean_log_variance(out, x_t, t)
        true_mean, true_log_variance = self.posterior_mean(x_0, x_t, t), self.at("posterior_log_variance", t)
        kl = 0.5 * (
            -1.0
            + log_variance
            - true_log_variance
            + torch.exp(true_log_variance - log_variance)
            + (true_mean - mean) ** 2 * torch.exp(-log_variance)
        )
        nll = -discretized_gaussian_log_likelihood(x_0, mean, 0.5 * log_variance)
        return torch.where(t == 0, nll.mean(dim=-1) / LOG2, kl.mean(dim=-1) / LOG2)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of the bin of width 2/255 around ``x`` under N(mean, exp(log_scale)^2), with the
    tanh approximation of the normal CDF and open-ended bins beyond +-0.999 (improved DDPM's image decoder,
    which MAR keeps for its latent tokens)."""

    def cdf(y):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3))))

    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionHead(AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""MAR's head (``DiffLoss`` / ``SimpleMLPAdaLN``): ``(x_t, t, z) -> (eps, v)``, sampled in `num_sampling_steps`.

    Args:
        condition_dim: width of the backbone's condition ``z``.
        token_channels: channels C of one VAE token.
        width: width of the residual stream (MAR-B / L / H: 1024 / 1280 / 1536).
        depth: number of AdaLN residual MLP blocks (MAR-B / L / H: 6 / 8 / 12).
        num_train_timesteps: steps of the cosine training schedule (MAR: 1000).
        num_sampling_steps: steps of MAR's respacing at sampling (MAR: 100); one forward each.
        mlp_ratio: hidden width of each block's MLP relative to `width` (MAR: 1).

    It has :class:`~parscale_ear_hf.models.energy_head.EnergyHead`'s interface (`noise_shape`,
    `noise_from_uniform`, `sample`, `loss`). Guidance differs: the energy head is given hidden vectors
    that the pipeline has already mixed, this head mixes the two noise predictions itself at every
    diffusion step, so :meth:`sample` takes the conditional and the unconditional ``z`` and the scale
    (``guidance_in_head`` tells a sampling loop which kind of head it holds).
    ``enable_gradient_checkpointing()`` recomputes each block in the backward pass (MAR's ``--grad_checkpointing``).
    """

    _supports_gradient_checkpointing = True
    guidance_in_head = True

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
        self.time_proj = Timesteps(TIME_FREQUENCY_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(TIME_FREQUENCY_DIM, width)
        self.cond_proj = nn.Linear(condition_dim, width)
        self.input_proj = nn.Linear(token_channels, width)
        self.blocks = nn.ModuleList([_AdaLNBlock(width, mlp_ratio, norm_affine=True) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, 2 * token_channels)
        self._init_weights()
        # Plain tensors, not buffers: `.to(bfloat16)` must not round the schedule.
        betas = cosine_betas(num_train_timesteps)
        self.train_schedule = DiffusionSchedule(betas, list(range(num_train_timesteps)))
        self.sample_schedule = DiffusionSchedule(betas, respaced_timesteps(num_train_timesteps, num_sampling_steps))

    def _init_weights(self) -> None:
        # MAR's: xavier-uniform Linear weights and zero biases, N(0, 0.02) timestep MLP, zero AdaLN and output.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        for layer in [block.modulation[1] for block in self.blocks] + [self.final_modulation[1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def noise_shape(self) -> tuple[int, int]:
        """Noise per token, `(num_sampling_steps + 1, C)`: ``x_T``, then one draw per step, in MAR's order
        (the last step adds none, as MAR's, whose `p_sample` draws it and multiplies it by 0)."""
        return (self.sample_schedule.num_steps + 1, self.config.token_channels)

    @staticmethod
    def noise_from_uniform(u: torch.Tensor) -> torch.Tensor:
        """``U[0, 1)`` -> standard normal (inverse CDF), so the pipeline draws every head's noise alike."""
        u = u.clamp(1e-7, 1 - 1e-7)
        return torch.special.erfinv(2 * u - 1) * 2**0.5

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """MAR's ``SimpleMLPAdaLN.forward``.

        Args:
            x_t: `(M, C)` noisy tokens.
            timesteps: `(M,)` or a scalar: training steps in [0, num_train_timesteps).
            z: `(M, condition_dim)` backbone conditions.

        Returns:
            `(M, 2C)`: ``eps`` then the variance interpolation ``v``.
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

    def guided_output(
        self, x: torch.Tensor, t: int, z: torch.Tensor, z_uncond: torch.Tensor | None, guidance_scale: float
    ) -> torch.Tensor:
        """The head's output `(M, 2C)` at sampling step ``t`` (a rank of the respacing). With ``z_uncond``, one
        forward over both conditions and ``eps = eps_u + cfg (eps_c - eps_u)``; the variance half stays the
        conditional one (MAR's ``forward_with_cfg``)."""
        step = self.sample_schedule.timestep_map[t].to(x.device)
        if z_uncond is None:
            return self(x.to(z.dtype), step, z).float()
        c = self.config.token_channels
        out = self(torch.cat([x, x]).to(z.dtype), step, torch.cat([z, z_uncond])).float()
        cond, uncond = out.chunk(2)
        eps = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        z_uncond: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Draw one token per row of ``z`` by MAR's ancestral sampler (``p_sample_loop``).

        Args:
            z: `(M, condition_dim)` conditional backbone outputs.
            temperature: multiplies the noise injected at every step (MAR's temperature; x_T is not scaled).
            generator: draws the noise when `noise` is None.
            noise: `(M, *noise_shape)` standard normal: ``noise[:, 0]`` is ``x_T``, ``noise[:, k]`` the
                draw of the k-th step.
            z_uncond: `(M, condition_dim)` unconditional outputs (the null class) for guidance, or None.
            guidance_scale: ``cfg`` of this call (the pipeline's schedule gives one per AR step); used with
                `z_uncond` only, at every diffusion step on ``eps``.

        Returns:
            `(M, token_channels)` tokens, in ``z``'s dtype.
        """
        if noise is None:
            device = generator.device if generator else z.device
            noise = torch.randn(z.shape[0], *self.noise_shape, generator=generator, device=device).to(z.device)
        # The chain x_T -> x_0 stays in float32 whatever the head's dtype, as MAR's: each step divides by
        # sqrt(alpha_bar_t) (down to 5e-5 at t = 999) and bf16 would round the state at every step.
        noise = noise.float()
        x = noise[:, 0]
        schedule = self.sample_schedule
        for k, t in enumerate(range(schedule.num_steps - 1, -1, -1), start=1):
            ts = torch.full((x.shape[0],), t, device=x.device)
            out = self.guided_output(x, t, z, z_uncond, guidance_scale)
            mean, log_variance = schedule.p_mean_log_variance(out, x, ts)
            x = mean if t == 0 else mean + torch.exp(0.5 * log_variance) * noise[:, k] * temperature
        return x.to(z.dtype)

    def loss(
        self,
        z: torch.Tensor,
        target: torch.Tensor,
        num_samples: int = 4,
        weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MAR's ``DiffLoss``: ``eps`` MSE plus the variational bound of the variance, for targets `(M, C)`
        given conditions `(M, condition_dim)`, each with `num_samples` random timesteps (``--diffusion_batch_mul``).

        The bound's ``eps`` is detached: it trains the variance half only. Rows are ``(sample, target)``:
        ``timesteps`` `(num_samples * M,)` and ``noise`` `(num_samples * M, C)` may be given (else drawn from
        ``generator``). ``weight`` `(M,)`: a weighted mean over targets (e.g. the mask), as the energy loss.
        """
        rows = num_samples * z.shape[0]
        device = generator.device if generator else z.device
        if timesteps is None:
            timesteps = torch.randint(0, self.config.num_train_timesteps, (rows,), generator=generator, device=device)
        if noise is None:
            noise = torch.randn(rows, target.shape[1], generator=generator, device=device)
        t, noise = timesteps.to(z.device), noise.to(z.device, torch.float32)
        x_0 = target.float().repeat(num_samples, 1)
        x_t = self.train_schedule.q_sample(x_0, t, noise)
        out = self(x_t.to(z.dtype), t, z.repeat(num_samples, 1)).float()
        eps, v = out.chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        vb = self.train_schedule.vlb_bits(torch.cat([eps.detach(), v], dim=-1), x_0, x_t, t)
        per_row = mse + vb
        if weight is None:
            return per_row.mean()
        weight = weight.to(per_row).repeat(num_samples)
        return (per_row * weight).sum() / weight.sum().clamp_min(1.0)

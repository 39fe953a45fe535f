"""ParScale-EAR pipeline: class label -> masked autoregressive sampling -> VAE decode."""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import resources

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from .models._checks import check_float, check_int
from .models.diffusion_head import DiffusionHead
from .models.ear_transformer import EARTransformer, TokenCache, latents_to_tokens, tokens_to_latents
from .models.energy_head import EnergyHead
from .models.lite_hybrid import LiteHybrid
from .models.lite_vae import LiteVAE
from .saving import (
    HUB_KWARGS,
    MANIFEST_NAME,
    atomic_save,
    hub_snapshot,
    looks_like_local_path,
    push_folder,
    restore_interrupted_save,
    rewrite_json,
    verified,
    verify_manifest,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_SCHEDULES = ("linear", "constant")
COMPONENTS = ("vae", "lite_hybrid", "transformer", "energy_head")
# The Hub entry file that lets `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`
# find this class; written beside model_index.json by `save_pretrained`.
HUB_ENTRY_MODULE = "pipeline_parscale_ear"


def mask_schedule(step: int, num_steps: int, num_tokens: int, num_masked: int) -> int:
    """How many tokens stay masked after ``step`` (0-based) of ``num_steps``: MAR / EAR's cosine schedule.

    Before the last step at least one token stays masked, and at least one is predicted while
    more than one is masked; after the last step nothing is masked. With more steps than tokens,
    once one token is left the steps before the last predict nothing, and the last step predicts
    it (as EAR's ``sample_tokens``).
    """
    if step >= num_steps - 1:
        return 0
    remaining = math.floor(num_tokens * math.cos(math.pi / 2 * (step + 1) / num_steps))
    return max(1, min(num_masked - 1, remaining))


def mix_guidance(h_cond: torch.Tensor, h_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance of hidden states before the head, as EAR: ``cfg * h_cond + (1 - cfg) * h_uncond``.

    Taken in float32 and rounded once to `h_cond`'s dtype: at cfg = 3 the two products are about 3x and 2x the
    result and nearly cancel, so in bf16 their own roundings would add up to 5x the result's.
    """
    return (cfg * h_cond.float() + (1 - cfg) * h_uncond.float()).to(h_cond.dtype)


def predicting_steps(num_steps: int, num_tokens: int) -> list[int]:
    """The steps of :func:`mask_schedule` that predict at least one token, in order.

    While more than one token is masked every step predicts one or more; once one is left, nothing is
    predicted until the last step. So with more steps than tokens the steps between are skipped, and the
    list has at most `num_tokens` entries whatever `num_steps` is.
    """
    steps, masked = [], num_tokens
    for step in range(num_steps):
        if masked == 1 and step < num_steps - 1:
            return [*steps, num_steps - 1]
        steps.append(step)
        masked = mask_schedule(step, num_steps, num_tokens, masked)
    return steps


@dataclass(frozen=True)
class SamplingCache:
    r"""LazyMAR's training-free sampling caches (Yan et al., ICCV 2025); pass as ``pipe(..., cache=...)``.

    Sampling is exact without it (``cache=None``, the default). Every `refresh_every` steps (and at the
    first step) the backbone runs in full, as exact sampling does, and fills the caches; the steps
    between reuse them:

    - **token cache**: the first `full_layers` blocks run over every position; above them only the
      tokens to predict, the tokens decoded since the last pass and the `token_share` of the other
      positions whose features changed most are recomputed; the rest reuse their cached keys and values.
    - **condition cache**: with guidance, the unconditional pass is skipped and the unconditional hidden
      states are the conditional ones plus the difference ``h_uncond - h_cond`` of the last refresh.

    Args:
        token_cache: use the token cache.
        token_share: share of the positions that are neither predicted nor newly decoded that the
            token cache recomputes anyway, those whose features changed most; in [0, 1].
        condition_cache: use the condition cache (only acts with guidance, `guidance_scale` > 1).
        refresh_every: a full pass every this many steps (1: every step, which is exact sampling up to
            float rounding).

    The defaults were chosen on the demo model at 16 steps, batch 16 (1,000 samples, demo-FID against the
    held-out split): they cost no measurable quality there and skip the most work of the settings tried;
    the benchmark's `quality` section measures them at 8 to 64 steps.
        full_layers: blocks computed over every position by the token cache, >= 1 and below the
            backbone's `num_layers`; the last of them says which positions changed most.
    """

    token_cache: bool = True
    token_share: float = 0.1
    condition_cache: bool = True
    refresh_every: int = 8
    full_layers: int = 1

    def __post_init__(self):
        for name in ("token_cache", "condition_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingCache: `{name}` must be True or False, got {getattr(self, name)!r}.")
        check_float("SamplingCache", "token_share", self.token_share, 0.0, 1.0)
        check_int("SamplingCache", "refresh_every", self.refresh_every, 1)
        check_int("SamplingCache", "full_layers", self.full_layers, 1)

    @property
    def enabled(self) -> bool:
        """Whether any cache is on (with both off, sampling is exact)."""
        return self.token_cache or self.condition_cache


class _CacheState:
    """What the caches hold during one sampling run."""

    def __init__(self):
        self.tokens: TokenCache | None = None
        self.uncond_minus_cond: torch.Tensor | None = None  # (B, N, D) float32, from the last refresh
        self.last_refresh = -1
        self.layout: tuple | None = None  # which passes filled the caches; another layout refreshes


def _expand_to(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Index `(B, T)` -> `(B, T, width)` for gather / scatter along dim 1."""
    return positions.unsqueeze(-1).expand(-1, -1, width)


def _gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`x` `(B, N, ...)` at `positions` `(B, T)` -> `(B, T, ...)`."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index)


def _flatten_labels(class_labels) -> list:
    """Class labels in a list, tuple, tensor or array of any shape (DiTPipeline accepts ``[[1], [1]]``), flattened."""
    if hasattr(class_labels, "tolist"):  # tensors, numpy arrays and numpy scalars
        class_labels = class_labels.tolist()
    if isinstance(class_labels, (list, tuple)):
        return [label for item in class_labels for label in _flatten_labels(item)]
    return [class_labels]


def _vae_spatial_factor(vae) -> int:
    if isinstance(vae, LiteVAE):
        return 2**vae.config.levels
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _uniform(batch: int, shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """``U[0, 1)`` of shape `(batch, *shape)`; with a list of generators, row i comes from generator i alone."""
    if isinstance(generator, list):
        rows = [torch.rand(shape, generator=g, device=g.device) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand((batch, *shape), generator=generator, device=gen_device).to(device)


@contextmanager
def _eval_mode(*modules: torch.nn.Module):
    """Sample with dropout off even when a component is shared with a training loop; restore after."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)


def check_components(vae, lite_hybrid, transformer, energy_head) -> None:
    """Raise a ValueError / TypeError naming the fields when the four components do not fit together."""
    expected = {
        "vae": (LiteVAE, AutoencoderKL),
        "lite_hybrid": (LiteHybrid,),
        "transformer": (EARTransformer,),
        # MAR's diffusion head fits the same slot: the baseline of the benchmarks and ablations.
        "energy_head": (EnergyHead, DiffusionHead),
    }
    given = {"vae": vae, "lite_hybrid": lite_hybrid, "transformer": transformer, "energy_head": energy_head}
    for name, classes in expected.items():
        if not isinstance(given[name], classes):
            names = " or ".join(c.__name__ for c in classes)
            raise TypeError(f"ParScaleEARPipeline: `{name}` must be a {names}, got {type(given[name]).__name__}.")
    pairs = [
        (
            "vae.config.latent_channels",
            vae.config.latent_channels,
            "transformer.config.in_channels",
            transformer.config.in_channels,
        ),
        (
            "lite_hybrid.config.in_channels",
            lite_hybrid.config.in_channels,
            "transformer.config.in_channels",
            transformer.config.in_channels,
        ),
        (
            "energy_head.config.token_channels",
            energy_head.config.token_channels,
            "transformer.config.in_channels",
            transformer.config.in_channels,
        ),
        (
            "lite_hybrid.config.grid_size",
            lite_hybrid.config.grid_size,
            "transformer.config.grid_size",
            transformer.config.grid_size,
        ),
        (
            "energy_head.config.condition_dim",
            energy_head.config.condition_dim,
            "transformer.config.hidden_size",
            transformer.config.hidden_size,
        ),
    ]
    for name_a, a, name_b, b in pairs:
        if a != b:
            raise ValueError(
                f"ParScaleEARPipeline: components do not fit: {name_a}={a} but {name_b}={b}; they must be equal."
            )


class ParScaleEARPipeline(DiffusionPipeline):
    r"""Class-conditional image generation with EAR's energy head over a masked-AR ParScale backbone.

    Args:
        vae: a :class:`LiteVAE` or a ``diffusers.AutoencoderKL``; decodes tokens to images.
        lite_hybrid: :class:`LiteHybrid`, enhances the visible tokens before each backbone pass.
        transformer: :class:`EARTransformer`, the masked autoregressive backbone.
        energy_head: :class:`EnergyHead`, samples one token per position in one forward; or MAR's
            :class:`DiffusionHead` (`num_sampling_steps` forwards per token), the speed baseline.
        id2label: optional ``{class id: "name, synonym, ..."}``; saved in `model_index.json`.
    """

    model_cpu_offload_seq = "lite_hybrid->transformer->energy_head->vae"
    _callback_tensor_inputs = ["tokens", "latents", "mask"]

    def __init__(
        self,
        vae: LiteVAE | AutoencoderKL,
        lite_hybrid: LiteHybrid,
        transformer: EARTransformer,
        energy_head: EnergyHead | DiffusionHead,
        id2label: dict | None = None,
    ):
        super().__init__()
        check_components(vae, lite_hybrid, transformer, energy_head)
        self.register_modules(vae=vae, lite_hybrid=lite_hybrid, transformer=transformer, energy_head=energy_head)
        # JSON keys are strings: store them so, to make the config identical after a reload.
        id2label = self._check_id2label(id2label, transformer.config.num_classes)
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} if id2label else None)
        self.labels = {}
        for key, value in (id2label or {}).items():
            for name in value.split(","):
                self.labels[name.strip()] = key
        self.labels = dict(sorted(self.labels.items()))
        self._compiled_hidden = None
        self.vae_scale_factor = _vae_spatial_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @staticmethod
    def _check_id2label(id2label, num_classes: int) -> dict[int, str] | None:
        if id2label is None:
            return None
        if not isinstance(id2label, dict):
            raise TypeError(
                f"ParScaleEARPipeline: `id2label` must be a dict {{class id: name}}, got {type(id2label).__name__}."
            )
        out = {}
        for key, value in id2label.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ValueError(
                    f"ParScaleEARPipeline: `id2label` key {key!r} is not a class id (an integer)."
                ) from None
            if not 0 <= idx < num_classes or not isinstance(value, str):
                raise ValueError(
                    f"ParScaleEARPipeline: `id2label` entry {key!r}: {value!r} must map an id in "
                    f"[0, {num_classes - 1}] to a name string."
                )
            out[idx] = value
        return out

    @property
    def id2label(self) -> dict[int, str] | None:
        """``{class id: name}`` or None."""
        stored = self.config.id2label
        return {int(k): v for k, v in stored.items()} if stored else None

    @property
    def grid_size(self) -> int:
        return self.transformer.config.grid_size

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (any synonym of `id2label`) to ids, like ``DiTPipeline.get_label_ids``."""
        names = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError("ParScaleEARPipeline: this pipeline has no `id2label`, so class labels must be ints.")
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            shown = ", ".join(repr(k) for k in list(self.labels)[:20])
            more = "" if len(self.labels) <= 20 else f", ... ({len(self.labels)} names)"
            raise ValueError(f"ParScaleEARPipeline: unknown class name(s) {unknown}; accepted names: {shown}{more}.")
        return [self.labels[n] for n in names]

    def class_ids(self, class_labels) -> list[int]:
        """Class ids of ``class_labels``: ints or names, alone or in a list, tuple, tensor or array of any shape.

        Nested labels are flattened (``[[1], [2]]`` is ``[1, 2]``, as in ``DiTPipeline``); raises for
        unknown names, out-of-range ids and anything else.
        """
        labels = _flatten_labels(class_labels)
        if not labels:
            raise ValueError(
                f"ParScaleEARPipeline: `class_labels` must hold at least one int or name, got {class_labels!r}."
            )
        num_classes = self.transformer.config.num_classes
        ids = []
        for label in labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, numbers.Integral) and not isinstance(label, bool) and 0 <= label < num_classes:
                ids.append(int(label))
            else:
                raise ValueError(
                    f"ParScaleEARPipeline: class label {label!r} is out of range; accepted: ints in "
                    f"[0, {num_classes - 1}] or class names from `id2label` (alone, or in a list, tuple, tensor or "
                    f"array of any shape)."
                )
        return ids

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the running (or last) call; a step callback may set `_guidance_scale`."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the next step runs the unconditional pass: `guidance_scale` > 1 (as in diffusers)."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """Steps that the running (or last) call runs: `num_inference_steps`, less the steps that would
        predict nothing (:func:`predicting_steps`)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `_interrupt` to True in a step callback to skip the remaining steps (as in diffusers)."""
        return self._interrupt

    def _check_sampling_args(
        self, num_inference_steps, guidance_scale, guidance_schedule, temperature, callback_on_step_end_tensor_inputs
    ) -> None:
        owner = "ParScaleEARPipeline"
        # More steps than tokens are allowed, as in EAR: the extra steps predict nothing (and are skipped).
        check_int(owner, "num_inference_steps", num_inference_steps, 1)
        check_float(owner, "guidance_scale", guidance_scale, 1.0, float("inf"))
        check_float(owner, "temperature", temperature, 0.0, float("inf"))
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(
                f"{owner}: `guidance_schedule` must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}."
            )
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"{owner}: `callback_on_step_end_tensor_inputs` {bad} not in {self._callback_tensor_inputs}."
            )

    def check_inputs(
        self,
        num_inference_steps,
        guidance_scale,
        guidance_schedule,
        temperature,
        num_images_per_class,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Validate the sampling arguments before any work starts."""
        self._check_sampling_args(
            num_inference_steps, guidance_scale, guidance_schedule, temperature, callback_on_step_end_tensor_inputs
        )
        check_int("ParScaleEARPipeline", "num_images_per_class", num_images_per_class, 1)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"ParScaleEARPipeline: `output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents `(B, C, h, w)` -> images `(B, 3, H, W)` in [-1, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(z).sample

    @torch.no_grad()
    def sample_tokens(
        self,
        class_ids: torch.LongTensor,
        orders: torch.LongTensor,
        noise: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_schedule: str = "linear",
        temperature: float = 0.7,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("tokens",),
        cache: SamplingCache | None = None,
    ) -> torch.Tensor:
        r"""Masked autoregressive sampling from given generation orders and noise: EAR's ``sample_tokens``.

        With the LiteHybrid off and ``parscale_n=1`` this is the math of the authors'
        ``EAR.sample_tokens`` (shaochenze/EAR, `models/ear.py`), with the noise that their
        ``ScoreLoss.sample`` draws passed in. It is the only sampler: trained weights do not depend
        on it, so there is no other variant to keep. While `m` tokens are masked, they are the
        positions ``orders[:, :m]``. Step `k` of `K` keeps ``m_k = mask_schedule(k, K, N, m)`` masked,
        and predicts the others still masked from the backbone's hidden states, mixed before the head
        as ``cfg_k * h_cond + (1 - cfg_k) * h_uncond``. The "linear" schedule uses
        ``cfg_k = 1 + (cfg - 1) * (N - max(1, m_k)) / N`` (EAR / MAR count at least one masked token,
        so even the last step uses ``1 + (cfg - 1) (N - 1) / N``, not `cfg`); "constant" uses `cfg`.
        With more steps than tokens, once one token is left the steps before the last predict nothing,
        and the last step predicts it: as in EAR, but those steps are skipped (:func:`predicting_steps`;
        a warning says so), so the time does not grow with them. `num_timesteps` counts the steps run.

        `cfg` is read from ``self._guidance_scale`` at every step, so a step callback can change it
        (diffusers' dynamic guidance): at most 1 skips the unconditional pass from the next step on,
        above 1 runs it.

        Args:
            class_ids: `(B,)` class ids.
            orders: `(B, N)` one permutation of ``range(N)`` per image (N = grid_size**2).
            noise: `(B, N, *energy_head.noise_shape)` in the head's noise space (what
                ``energy_head.sample(z, temperature, noise=...)`` takes); token `n` of image `b` is
                sampled with ``noise[b, n]``.
            num_inference_steps: autoregressive steps `K`, any integer >= 1.
            guidance_scale: classifier-free guidance `cfg` >= 1; 1 disables guidance.
            guidance_schedule: "linear" (EAR / MAR) or "constant".
            temperature: the energy head's temperature; EAR uses 0.7.
            callback_on_step_end: ``fn(pipe, i, step, tensors) -> dict`` called after the `i`-th step
                run (schedule step `step`; the two differ only past skipped steps) with the tensors
                named in `callback_on_step_end_tensor_inputs`: `tokens` `(B, N, C)`, `latents`
                `(B, C, h, w)` (a view of the tokens, as ``output_type="latent"`` returns them) and
                `mask` `(B, N)` (read-only). A returned `tokens` or `latents` that is a new tensor
                replaces the tokens; new tensors for both raise a ValueError. Setting
                ``pipe._interrupt = True`` skips the remaining steps (tokens still masked stay 0).
            callback_on_step_end_tensor_inputs: which tensors the callback receives.
            cache: a :class:`SamplingCache` for LazyMAR's token and condition caches (faster, not exact);
                None (or both caches off) samples exactly. A callback that returns new tokens makes the
                next step refresh the caches.

        Returns:
            Tokens `(B, N, C)` in raster order (see ``tokens_to_latents``).
        """
        self._check_sampling_args(
            num_inference_steps, guidance_scale, guidance_schedule, temperature, callback_on_step_end_tensor_inputs
        )
        self._check_cache(cache)
        head = self.energy_head
        n, channels = self.grid_size**2, self.transformer.config.in_channels
        if class_ids.dim() != 1 or len(class_ids) == 0:
            raise ValueError(
                f"ParScaleEARPipeline.sample_tokens: `class_ids` must be a 1-d tensor of B >= 1 class ids, got "
                f"shape {tuple(class_ids.shape)}."
            )
        batch = len(class_ids)
        for name, value, shape in (("orders", orders, (batch, n)), ("noise", noise, (batch, n, *head.noise_shape))):
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"ParScaleEARPipeline.sample_tokens: `{name}` must have shape {shape} for {batch} images of "
                    f"N = {n} tokens, got {tuple(value.shape)}."
                )
        steps = predicting_steps(num_inference_steps, n)
        if len(steps) < num_inference_steps:
            warnings.warn(
                f"ParScaleEARPipeline: num_inference_steps={num_inference_steps} but only {len(steps)} steps "
                f"predict tokens for N = {n} tokens; the other {num_inference_steps - len(steps)} (once one token "
                "is left, before the last step) predict nothing, as in EAR, and are skipped.",
                stacklevel=3,
            )
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(steps)
        self._interrupt = False

        device, dtype = self._execution_device, self.transformer.dtype
        labels = class_ids.to(device)
        null_labels = torch.full_like(labels, self.transformer.null_class)
        # The noise stays float32 in any dtype: the diffusion head's chain x_T -> x_0 runs in float32 from it.
        orders, noise = orders.to(device), noise.to(device)
        tokens = torch.zeros(batch, n, channels, device=device, dtype=dtype)
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
        state = _CacheState() if cache is not None and cache.enabled else None
        hidden = self._compiled_hidden or self._hidden
        # While m tokens are masked they are orders[:, :m]: a step predicts the slice orders[:, m_next:m].
        num_masked = last_pass = n

        # Dropout off while sampling, even for components shared with a training loop.
        with _eval_mode(self.lite_hybrid, self.transformer, self.energy_head):
            for i, step in enumerate(self.progress_bar(steps)):
                if self.interrupt:
                    continue
                num_masked_next = mask_schedule(step, num_inference_steps, n, num_masked)
                mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :num_masked_next], True)
                cfg = self._guidance_scale
                if guidance_schedule == "linear":
                    cfg = 1 + (cfg - 1) * (n - max(1, num_masked_next)) / n
                uncond = null_labels if self.do_classifier_free_guidance else None
                if state is None:
                    # Raster order within each image, as boolean indexing by the mask would give.
                    predict = orders[:, num_masked_next:num_masked].sort(dim=1).values
                    h_cond, h_uncond = hidden(tokens, mask, labels, uncond)
                    z = _gather_rows(h_cond, predict)
                    if uncond is not None:
                        z = mix_guidance(z, _gather_rows(h_uncond, predict), cfg)
                else:
                    predict = orders[:, num_masked_next:num_masked]
                    recompute = orders[:, num_masked_next:last_pass]  # to predict, then decoded since the last pass
                    z = self._cached_hidden(state, cache, step, tokens, mask, labels, uncond, recompute, predict, cfg)
                sampled = head.sample(z.flatten(0, 1), temperature, noise=_gather_rows(noise, predict).flatten(0, 1))
                tokens.scatter_(1, _expand_to(predict, channels), sampled.view(batch, -1, channels).to(dtype))
                last_pass = num_masked
                mask, num_masked = mask_next, num_masked_next

                if callback_on_step_end is not None:
                    local = {"tokens": tokens, "latents": tokens_to_latents(tokens, self.grid_size), "mask": mask}
                    given = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, step, given)
                    tokens = self._tokens_from_callback(outputs, local, step)
                    if state is not None and tokens is not local["tokens"]:
                        state.layout = None  # new tokens: the caches are stale, refresh at the next step
        return tokens

    @staticmethod
    def _tokens_from_callback(outputs: dict, local: dict, step: int) -> torch.Tensor:
        # Callbacks commonly return their inputs unchanged (diffusers' examples do), so only a new
        # tensor replaces the tokens; in-place edits need nothing: `latents` is a view of `tokens`.
        # Compared with the pipeline's own tensors: a callback may have put new ones in the dict it got.
        new = {k: outputs[k] for k in ("tokens", "latents") if k in outputs and outputs[k] is not local[k]}
        if len(new) == 2:
            raise ValueError(
                f"ParScaleEARPipeline: `callback_on_step_end` returned both a new `tokens` and a new `latents` at "
                f"step {step}; return a new tensor for one of them only (the other unchanged, or left out)."
            )
        if "latents" in new:
            return latents_to_tokens(new["latents"])
        return new.get("tokens", local["tokens"])

    def _check_cache(self, cache) -> None:
        if cache is None:
            return
        if not isinstance(cache, SamplingCache):
            raise TypeError(
                f"ParScaleEARPipeline: `cache` must be a SamplingCache or None (exact sampling), got {cache!r}."
            )
        layers = self.transformer.config.num_layers
        if cache.token_cache and cache.full_layers >= layers:
            raise ValueError(
                f"ParScaleEARPipeline: `cache.full_layers` is {cache.full_layers} but the backbone has {layers} "
                f"blocks; the token cache needs full_layers in [1, {layers - 1}] (or token_cache=False)."
            )

    def _hidden(self, tokens, mask, labels, null_labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One exact step's backbone: hidden states `(B, N, D)` of the conditional pass and, given
        `null_labels`, of the unconditional one (None otherwise), run as one batch."""
        x = self.lite_hybrid(tokens, mask)
        if null_labels is None:
            return self.transformer(x, labels, mask), None
        h_cond, h_uncond = self.transformer(
            torch.cat([x, x]), torch.cat([labels, null_labels]), torch.cat([mask, mask])
        ).chunk(2)
        return h_cond, h_uncond

    def _cached_hidden(self, state, cache, step, tokens, mask, labels, null_labels, recompute, predict, cfg):
        """Guided hidden states `(B, T, D)` at `predict` `(B, T)` through the caches (see :class:`SamplingCache`).

        `recompute` `(B, M)` starts with `predict` and goes on with the positions decoded since the last pass.
        """
        transformer = self.transformer
        guided = null_labels is not None
        # Rows the backbone runs: both passes as one batch, unless the condition cache replaces the second.
        both = guided and not cache.condition_cache
        layout = (guided, both)
        x = self.lite_hybrid(tokens, mask)
        rows = (
            (torch.cat([x, x]), torch.cat([labels, null_labels]), torch.cat([mask, mask]))
            if both
            else (x, labels, mask)
        )
        if state.layout != layout or step - state.last_refresh >= cache.refresh_every:
            state.tokens = TokenCache(cache.full_layers) if cache.token_cache else None
            h = transformer(*rows, cache=state.tokens)
            if guided and cache.condition_cache:
                state.uncond_minus_cond = transformer(x, null_labels, mask).float() - h.float()
            state.layout, state.last_refresh = layout, step
            z = _gather_rows(h, predict.repeat(2, 1) if both else predict)
        elif cache.token_cache:
            num_other = transformer.config.buffer_size + self.grid_size**2 - recompute.shape[1]
            z = transformer.forward_partial(
                *rows,
                cache=state.tokens,
                positions=recompute.repeat(2, 1) if both else recompute,
                num_out=predict.shape[1],
                num_extra=round(cache.token_share * num_other),
            )
        else:
            z = _gather_rows(transformer(*rows), predict)
        if not guided:
            return z
        if both:
            z_cond, z_uncond = z.chunk(2)
        else:
            z_cond = z
            z_uncond = z.float() + _gather_rows(state.uncond_minus_cond, predict)
        return mix_guidance(z_cond, z_uncond, cfg)

    def enable_compiled_step(self, **compile_kwargs) -> None:
        """Run exact sampling's backbone step (LiteHybrid and transformer, both guidance passes) under
        ``torch.compile`` as one graph (``fullgraph=True``: a graph break is an error).

        Its shapes are static: batch, N and hidden size do not change between steps, so it compiles once
        per batch size and guidance on / off (``dynamic=False`` unless given). On a GPU, pass
        ``mode="reduce-overhead"`` for CUDA graphs, and load the pipeline in bf16 (``dtype=torch.bfloat16``).
        Other keyword arguments go to ``torch.compile``. The caches of :class:`SamplingCache` run eagerly.
        """
        compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._compiled_hidden = torch.compile(self._hidden, **compile_kwargs)

    def disable_compiled_step(self) -> None:
        """Back to the eager step."""
        self._compiled_hidden = None

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int] | list[str] | torch.Tensor,
        num_inference_steps: int = 64,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "linear",
        temperature: float = 0.7,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_class: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["tokens"],  # noqa: B006 (diffusers' convention)
        cache: SamplingCache | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images of the given classes.

        Args:
            class_labels: class ids or names (see :meth:`get_label_ids`), alone or in a list, tuple,
                tensor or array of any shape (flattened); one image each (times `num_images_per_class`).
            num_inference_steps: autoregressive steps, any integer >= 1; a cosine schedule decides
                how many tokens are predicted at each (with more steps than tokens, some predict
                nothing, as in EAR). See :meth:`sample_tokens`.
            guidance_scale: classifier-free guidance ``cfg``; hidden states are mixed before the
                head as ``cfg_k * h_cond + (1 - cfg_k) * h_uncond``. 1 disables guidance. A step
                callback may change `pipe._guidance_scale` for the steps after it.
            guidance_schedule: "linear" (EAR / MAR: ``cfg_k`` grows from about 1 towards
                `guidance_scale` as tokens are revealed, ending at ``1 + (cfg - 1) (N - 1) / N``)
                or "constant" (``cfg_k = cfg``).
            temperature: the energy head's temperature (scales the AdaLN shifts); EAR uses 0.7.
            generator: a ``torch.Generator``, or one per image so that each image is reproducible
                alone or inside any batch.
            num_images_per_class: images per entry of `class_labels`.
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (scaled VAE latents
                `(B, C, h, w)`).
            return_dict: return an :class:`~diffusers.ImagePipelineOutput` instead of a tuple.
            callback_on_step_end: ``fn(pipe, i, step, tensors) -> dict`` called after the `i`-th step
                run (schedule step `step`; the two differ only past skipped steps) with the tensors
                named in `callback_on_step_end_tensor_inputs` (`tokens` `(B, N, C)`, `latents`
                `(B, C, h, w)`, `mask` `(B, N)`, read-only); a returned new `tokens` or
                `latents` replaces the current tokens. Setting `pipe._interrupt = True` skips the
                remaining steps. See :meth:`sample_tokens`.
            callback_on_step_end_tensor_inputs: which tensors the callback receives.
            cache: None (the default) samples exactly, as EAR does; a :class:`SamplingCache` turns on
                LazyMAR's token and condition caches: faster, slightly different images.

        Returns:
            :class:`~diffusers.ImagePipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        self.check_inputs(
            num_inference_steps,
            guidance_scale,
            guidance_schedule,
            temperature,
            num_images_per_class,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        self._check_cache(cache)
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"ParScaleEARPipeline: `generator` must be a torch.Generator, a list of them (one per image) or "
                f"None, got {generator!r}."
            )
        ids = [i for i in self.class_ids(class_labels) for _ in range(num_images_per_class)]
        batch = len(ids)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"ParScaleEARPipeline: got {len(generator)} generators for {batch} images; pass one generator "
                f"or exactly one per image (len(class_labels) * num_images_per_class)."
            )

        device, n, head = self._execution_device, self.grid_size**2, self.energy_head
        # All randomness of image i is drawn up front from its own generator: its order, then
        # one noise vector per token (each token is sampled exactly once).
        orders = torch.argsort(_uniform(batch, (n,), generator, device), dim=1)
        noise = head.noise_from_uniform(_uniform(batch, (n, *head.noise_shape), generator, device))
        tokens = self.sample_tokens(
            torch.tensor(ids, device=device),
            orders,
            noise,
            num_inference_steps,
            guidance_scale,
            guidance_schedule,
            temperature,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            cache,
        )

        latents = tokens_to_latents(tokens, self.grid_size)
        if output_type == "latent":
            images = latents
        else:
            with _eval_mode(self.vae):
                images = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # Saving and loading -------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """``DiffusionPipeline.save_pretrained`` (safetensors only), atomic, plus the Hub entry file and a manifest.

        The folder is written beside `save_directory` and swapped in only when complete (see
        :mod:`parscale_ear_hf.saving`): a kill, a full disk or a concurrent save leaves the old
        folder or the new one, never a mix. `checksums.sha256` lists the weights, checked by
        :meth:`from_pretrained`. Top-level files of the old folder that this save does not write
        (its `README.md` card, `training/` logs) are kept.

        `model_index.json` names the class as ``["pipeline_parscale_ear", "ParScaleEARPipeline"]``
        so that ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds it;
        ``ParScaleEARPipeline.from_pretrained`` ignores the entry file and needs no remote code.
        Local paths (`_name_or_path`) are not written, so a re-saved pipeline is identical.

        With `push_to_hub`, the finished folder itself is uploaded (`repo_id`, default the folder's
        name; `token`, `private`, `commit_message`, `create_pr` as in diffusers), with whatever
        else it holds: its `README.md` (the card of :func:`parscale_ear_hf.model_card.write_model_card`)
        goes up as the repo's model card. diffusers' own `push_to_hub` would save again into a
        temporary folder and write a generic card there.
        """
        if not kwargs.pop("safe_serialization", True):
            raise ValueError("ParScaleEARPipeline: only safetensors are supported; `safe_serialization` must be True.")
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        atomic_save(save_directory, lambda folder: self._write_folder(folder, **kwargs), type(self).__name__)
        if push_to_hub:
            push_folder(save_directory, type(self).__name__, **hub_kwargs)

    def _write_folder(self, folder: str, **kwargs) -> None:
        super().save_pretrained(folder, safe_serialization=True, **kwargs)
        entry = resources.files("parscale_ear_hf.hub_entry").joinpath(f"{HUB_ENTRY_MODULE}.py")
        with resources.as_file(entry) as entry_path:
            shutil.copyfile(entry_path, os.path.join(folder, f"{HUB_ENTRY_MODULE}.py"))

        def without_local_path(config: dict) -> dict:
            config.pop("_name_or_path", None)
            return config

        rewrite_json(
            os.path.join(folder, self.config_name),
            lambda index: {**without_local_path(index), "_class_name": [HUB_ENTRY_MODULE, type(self).__name__]},
        )
        for name in COMPONENTS:
            rewrite_json(os.path.join(folder, name, "config.json"), without_local_path)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # Our own class needs no remote code: read the entry-file class name back as plain.
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        name = config.get("_class_name")
        if isinstance(name, list) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return out

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, verify_checksums: bool = True, **kwargs
    ):
        """Load from a folder or a Hub repo id (online, or offline from the HF cache).

        A repo id is fetched with ``huggingface_hub.snapshot_download`` (configs, safetensors, the
        manifest and the entry file only; never pickles), which also resolves it offline from the
        cache (``HF_HUB_OFFLINE=1``), and then loaded as a folder. Online, diffusers' own repo-id
        path rejects components whose `model_index.json` entry is a module path of an installed
        package (it looks for ``<component>/<module path>.py`` in the repo), hence this detour.

        The weights are checked against the folder's `checksums.sha256` when it has one, and each component
        against the hashes in its `config.json` (see :mod:`parscale_ear_hf.saving`); an OSError names the
        file that differs. `verify_checksums=False` skips both checks.
        """
        path = os.fspath(pretrained_model_name_or_path)
        restore_interrupted_save(path)
        if not os.path.isdir(path):
            if os.path.exists(path) or looks_like_local_path(path):
                raise FileNotFoundError(
                    f"ParScaleEARPipeline.from_pretrained: {path!r} is not an existing folder; pass a folder written "
                    "by `save_pretrained` or a Hub repo id ('name' or 'org/name')."
                )
            path = hub_snapshot(
                path,
                kwargs,
                "ParScaleEARPipeline.from_pretrained",
                ["*.json", "*.safetensors", "*.py", "*.md", "*.txt", MANIFEST_NAME],
            )
        if verify_checksums:
            verify_manifest(path, "ParScaleEARPipeline.from_pretrained")
        cls._check_component_folders(path, kwargs)
        kwargs.setdefault("use_safetensors", True)
        # Checked against the manifest (or waived): the components need not hash their weights again.
        done = not verify_checksums or os.path.isfile(os.path.join(path, MANIFEST_NAME))
        with verified(path) if done else nullcontext():
            return super().from_pretrained(path, **kwargs)

    @classmethod
    def _check_component_folders(cls, folder: str, kwargs: dict) -> None:
        """Raise naming the component and its folder when a saved component is missing (diffusers names a file)."""
        index_path = os.path.join(folder, cls.config_name)
        if not os.path.isfile(index_path):
            return  # diffusers' own error names model_index.json
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        for name in COMPONENTS:
            expected = os.path.join(folder, name)
            entry = index.get(name)
            # A component passed as a keyword argument is not read from the folder.
            if name in kwargs or not isinstance(entry, list):
                continue
            if not os.path.isfile(os.path.join(expected, "config.json")):
                raise FileNotFoundError(
                    f"ParScaleEARPipeline.from_pretrained: component `{name}` ({entry[-1]}) is missing: expected the "
                    f"folder {expected} with its config.json and weights, as save_pretrained writes it; restore it, "
                    f"or pass `{name}=` a loaded {entry[-1]}."
                )

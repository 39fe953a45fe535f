"""ParScale-EAR pipeline: class label -> masked autoregressive sampling -> VAE decode.

LazyMAR's sampling caches are in :mod:`parscale_ear_hf.sampling_cache`, saving and loading in
:mod:`parscale_ear_hf.hub_mixin`, the checks of the components and labels in
:mod:`parscale_ear_hf.pipeline_components`, the sampling loop's plumbing (per-image randomness, the
checks of given tensors, step callbacks' results) in :mod:`parscale_ear_hf.sampling_utils`, the mask and
guidance schedules MAR and EAR share in :mod:`parscale_ear_hf.schedules`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from .hub_mixin import HUB_ENTRY_MODULE, PipelineHubMixin
from .models._checks import check_float, check_int
from .models.diffusion_head import DiffusionHead
from .models.ear_transformer import EARTransformer, tokens_to_latents
from .models.energy_head import EnergyHead
from .models.lite_hybrid import LiteHybrid
from .models.lite_vae import LiteVAE
from .models.mar_transformer import MARTransformer
from .pipeline_components import (
    SAMPLING_DEFAULTS,
    check_components,
    check_id2label,
    check_sampling_defaults,
    eval_mode,
    flatten_labels,
    label_names,
    vae_spatial_factor,
)
from .sampling_cache import SamplingCache, SamplingCacheState, check_cache, gather_rows
from .sampling_utils import check_sampling_tensors, expand_to, tokens_from_callback, uniform, warn_skipped_steps
from .schedules import guidance_at, mask_schedule, mix_guidance, predicting_steps

# Re-exported (SamplingCache, HUB_ENTRY_MODULE, the schedules): user code and saved snippets import them from here.
__all__ = [
    "COMPONENTS",
    "GUIDANCE_SCHEDULES",
    "HUB_ENTRY_MODULE",
    "OUTPUT_TYPES",
    "ParScaleEARPipeline",
    "SamplingCache",
    "guidance_at",
    "mask_schedule",
    "mix_guidance",
    "predicting_steps",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GUIDANCE_SCHEDULES = ("linear", "constant")
COMPONENTS = ("vae", "lite_hybrid", "transformer", "energy_head")


class ParScaleEARPipeline(PipelineHubMixin, DiffusionPipeline):
    r"""Class-conditional image generation with EAR's energy head over a masked-AR ParScale backbone.

    One sampling loop serves two backbones and two heads: EAR's (:class:`EARTransformer` + :class:`EnergyHead`,
    guidance on the hidden states before the head) and MAR's (:class:`MARTransformer` + :class:`DiffusionHead`,
    guidance on the noise prediction at every diffusion step inside the head); `parscale-ear convert --mar`
    writes MAR's released checkpoints as such a pipeline.

    Args:
        vae: a :class:`LiteVAE` or a ``diffusers.AutoencoderKL``; decodes tokens to images.
        lite_hybrid: :class:`LiteHybrid`, enhances the visible tokens before each backbone pass (both branches
            off: the identity, as in EAR's and MAR's converted pipelines).
        transformer: :class:`EARTransformer` or MAR's :class:`MARTransformer`, the masked autoregressive backbone.
        energy_head: :class:`EnergyHead`, samples one token per position in one forward; or MAR's
            :class:`DiffusionHead` (`num_sampling_steps` forwards per token).
        id2label: optional ``{class id: "name, synonym, ..."}``; saved in `model_index.json`.
    """

    model_cpu_offload_seq = "lite_hybrid->transformer->energy_head->vae"
    _callback_tensor_inputs = ["tokens", "latents", "mask"]
    _component_names = COMPONENTS

    def __init__(
        self,
        vae: LiteVAE | AutoencoderKL,
        lite_hybrid: LiteHybrid,
        transformer: EARTransformer | MARTransformer,
        energy_head: EnergyHead | DiffusionHead,
        id2label: dict | None = None,
        sampling_defaults: dict | None = None,
    ):
        super().__init__()
        check_components(vae, lite_hybrid, transformer, energy_head)
        self.register_modules(vae=vae, lite_hybrid=lite_hybrid, transformer=transformer, energy_head=energy_head)
        # JSON keys are strings: store them so, to make the config identical after a reload.
        id2label = check_id2label(id2label, transformer.config.num_classes)
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} if id2label else None)
        self.register_to_config(sampling_defaults=check_sampling_defaults(sampling_defaults))
        try:
            self.check_inputs(*self.with_sampling_defaults(None, None, None, None), ("tokens",))
        except ValueError as error:
            raise ValueError(f"ParScaleEARPipeline: `sampling_defaults` {sampling_defaults!r}: {error}") from None
        self.labels = label_names(id2label)
        self._compiled_hidden = self._compiled_partial = None
        self.vae_scale_factor = vae_spatial_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def id2label(self) -> dict[int, str] | None:
        """``{class id: name}`` or None."""
        stored = self.config.id2label
        return {int(k): v for k, v in stored.items()} if stored else None

    @property
    def sampling_defaults(self) -> dict:
        """What ``pipe(...)`` and :meth:`sample_tokens` use for `num_inference_steps`, `guidance_scale`,
        `guidance_schedule` and `temperature` when left out: EAR's (64 steps, 3.0, "linear", 0.7), overridden by
        the pipeline's saved `sampling_defaults` (a pipeline converted from MAR saves MAR's temperature, 1.0).
        Set them with ``ParScaleEARPipeline(..., sampling_defaults={...})`` or
        ``from_pretrained(path, sampling_defaults={...})``; ``save_pretrained`` keeps them."""
        return {**SAMPLING_DEFAULTS, **(self.config.sampling_defaults or {})}

    def with_sampling_defaults(self, num_inference_steps, guidance_scale, guidance_schedule, temperature) -> tuple:
        """The four sampling arguments, each None replaced by :attr:`sampling_defaults`'s."""
        given = zip(SAMPLING_DEFAULTS, (num_inference_steps, guidance_scale, guidance_schedule, temperature))
        return tuple(self.sampling_defaults[name] if value is None else value for name, value in given)

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
        labels = flatten_labels(class_labels)
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

    def check_inputs(
        self,
        num_inference_steps,
        guidance_scale,
        guidance_schedule,
        temperature,
        callback_on_step_end_tensor_inputs,
        cache=None,
        num_images_per_class=1,
        output_type="pil",
        generator=None,
        num_class_labels=1,
    ) -> None:
        """Validate the arguments before any work starts: those of :meth:`sample_tokens` and, from
        `num_images_per_class` on, those that only :meth:`__call__` takes (`num_class_labels`: how many
        class labels it got, for the number of generators). Raises naming the argument."""
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
        check_int(owner, "num_images_per_class", num_images_per_class, 1)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"{owner}: `output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_cache(cache, self.transformer)
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(
                f"{owner}: `generator` must be a torch.Generator, a list of them (one per image) or None, got "
                f"{generator!r}."
            )
        batch = num_class_labels * num_images_per_class
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"{owner}: got {len(generator)} generators for {batch} images; pass one generator or exactly one "
                f"per image (len(class_labels) * num_images_per_class)."
            )

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
        num_inference_steps: int | None,
        guidance_scale: float | None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("tokens",),
        cache: SamplingCache | None = None,
    ) -> torch.Tensor:
        r"""Masked autoregressive sampling from given generation orders and noise: EAR's and MAR's ``sample_tokens``.

        With the LiteHybrid off and ``parscale_n=1`` this is the math of the authors' ``EAR.sample_tokens``
        (shaochenze/EAR, `models/ear.py`), with the noise that their ``ScoreLoss.sample`` draws passed in; with
        MAR's backbone and head it is ``MAR.sample_tokens`` (LTH14/mar, `models/mar.py`) with the noise of
        ``DiffLoss.sample``. While `m` tokens are masked, they are the positions ``orders[:, :m]``. Step `k` of
        `K` keeps ``m_k = mask_schedule(k, K, N, m)`` masked, and predicts the others still masked from the
        backbone's hidden states. Guidance at scale ``cfg_k`` (:func:`guidance_at`) is where the head wants it:
        EAR's energy head gets the hidden states mixed as ``cfg_k * h_cond + (1 - cfg_k) * h_uncond``; a head with
        ``guidance_in_head`` (MAR's diffusion head) gets both and mixes its noise predictions at every diffusion
        step. The "linear" schedule uses ``cfg_k = 1 + (cfg - 1) * (N - max(1, m_k)) / N`` (EAR / MAR count at
        least one masked token, so even the last step uses ``1 + (cfg - 1) (N - 1) / N``, not `cfg`); "constant"
        uses `cfg`.
        With more steps than tokens, once one token is left the steps before the last predict nothing, and the
        last step predicts it: as in EAR, but those steps are skipped (:func:`predicting_steps`; a warning says
        so), so the time does not grow with them. `num_timesteps` counts the steps run.

        `cfg` is read from ``self._guidance_scale`` at every step, so a step callback can change it (diffusers'
        dynamic guidance): at most 1 skips the unconditional pass from the next step on, above 1 runs it.

        Args:
            class_ids: `(B,)` class ids.
            orders: `(B, N)` one permutation of ``range(N)`` per image (N = grid_size**2).
            noise: `(B, N, *energy_head.noise_shape)` in the head's noise space (what
                ``energy_head.sample(z, temperature, noise=...)`` takes); token `n` of image `b` is sampled
                with ``noise[b, n]`` (MAR's head: `(num_sampling_steps + 1, C)`, ``x_T`` then each step's draw).
            num_inference_steps: autoregressive steps `K`, any integer >= 1.
            guidance_scale: classifier-free guidance `cfg` >= 1; 1 disables guidance.
            guidance_schedule: "linear" (EAR / MAR) or "constant".
            temperature: the head's temperature; EAR uses 0.7, MAR 1.0 (0.95 without guidance).
            Each of these four left None takes the pipeline's :attr:`sampling_defaults`.
            callback_on_step_end: ``fn(pipe, i, step, tensors) -> dict`` called after the `i`-th step run
                (schedule step `step`; the two differ only past skipped steps) with the tensors named in
                `callback_on_step_end_tensor_inputs`: `tokens` `(B, N, C)`, `latents` `(B, C, h, w)` (a view of
                the tokens, as ``output_type="latent"`` returns them) and `mask` `(B, N)` (read-only). A
                returned `tokens` or `latents` that is a new tensor replaces the tokens; new tensors for both
                raise a ValueError. Setting ``pipe._interrupt = True`` skips the remaining steps (tokens still
                masked stay 0).
            callback_on_step_end_tensor_inputs: which tensors the callback receives.
            cache: a :class:`SamplingCache` for LazyMAR's token and condition caches (faster, not exact); None
                (or both caches off) samples exactly. A callback that returns new tokens makes the next step
                refresh the caches.

        Returns:
            Tokens `(B, N, C)` in raster order (see ``tokens_to_latents``).
        """
        # (steps, guidance, schedule, temperature), the pipeline's defaults for those left None.
        sampling = self.with_sampling_defaults(num_inference_steps, guidance_scale, guidance_schedule, temperature)
        tensor_inputs = callback_on_step_end_tensor_inputs
        self.check_inputs(*sampling, tensor_inputs, cache)
        check_sampling_tensors(class_ids, orders, noise, self.grid_size**2, self.energy_head.noise_shape)
        return self._sample_tokens(class_ids, orders, noise, *sampling, callback_on_step_end, tensor_inputs, cache)

    def _sample_tokens(
        self,
        class_ids,
        orders,
        noise,
        num_inference_steps,
        guidance_scale,
        guidance_schedule,
        temperature,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        cache,
    ) -> torch.Tensor:
        """:meth:`sample_tokens` with its arguments checked (by :meth:`check_inputs`), under ``torch.no_grad``."""
        head = self.energy_head
        n, channels = self.grid_size**2, self.transformer.config.in_channels
        batch = len(class_ids)
        steps = predicting_steps(num_inference_steps, n)
        warn_skipped_steps(num_inference_steps, len(steps), n)
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
        state = None
        if cache and cache.enabled:
            state = SamplingCacheState(
                cache, self.lite_hybrid, self.transformer, num_inference_steps, self._compiled_partial
            )
        # While m tokens are masked they are orders[:, :m]: a step predicts the slice orders[:, m_next:m].
        num_masked = last_pass = n

        # Dropout off while sampling, even for components shared with a training loop.
        with eval_mode(self.lite_hybrid, self.transformer, self.energy_head):
            for i, step in enumerate(self.progress_bar(steps)):
                if self.interrupt:
                    continue
                num_masked_next = mask_schedule(step, num_inference_steps, n, num_masked)
                mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :num_masked_next], True)
                cfg = guidance_at(self._guidance_scale, guidance_schedule, n, num_masked_next)
                uncond = null_labels if self.do_classifier_free_guidance else None
                if state is None:
                    # Raster order within each image, as boolean indexing by the mask would give.
                    predict = orders[:, num_masked_next:num_masked].sort(dim=1).values
                    z_cond, z_uncond = self._exact_hidden(tokens, mask, labels, uncond, predict)
                else:
                    predict = orders[:, num_masked_next:num_masked]
                    recompute = orders[:, num_masked_next:last_pass]  # to predict, then decoded since the last pass
                    z_cond, z_uncond = state.hidden(step, tokens, mask, labels, uncond, recompute, predict)
                rows = {"temperature": temperature, "noise": gather_rows(noise, predict).flatten(0, 1)}
                if z_uncond is None:
                    sampled = head.sample(z_cond.flatten(0, 1), **rows)
                elif head.guidance_in_head:  # MAR's head: guidance on eps, at every diffusion step
                    z_uncond = z_uncond.to(z_cond.dtype).flatten(0, 1)
                    sampled = head.sample(z_cond.flatten(0, 1), z_uncond=z_uncond, guidance_scale=cfg, **rows)
                else:  # EAR's head: guidance on the hidden states, once
                    sampled = head.sample(mix_guidance(z_cond, z_uncond, cfg).flatten(0, 1), **rows)
                tokens.scatter_(1, expand_to(predict, channels), sampled.view(batch, -1, channels).to(dtype))
                last_pass = num_masked
                mask, num_masked = mask_next, num_masked_next

                if callback_on_step_end is not None:
                    local = {"tokens": tokens, "latents": tokens_to_latents(tokens, self.grid_size), "mask": mask}
                    given = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, step, given)
                    tokens = tokens_from_callback(outputs, local, step)
                    if state is not None and tokens is not local["tokens"]:
                        state.invalidate()
        return tokens

    def _exact_hidden(self, tokens, mask, labels, null_labels, predict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One exact step's backbone, eager or compiled: hidden states `(B, T, D)` at `predict` `(B, T)` of the
        conditional pass and, given `null_labels`, of the unconditional one (None otherwise)."""
        return (self._compiled_hidden or self._hidden)(tokens, mask, labels, null_labels, predict)

    def _hidden(self, tokens, mask, labels, null_labels, predict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_exact_hidden`, eagerly (what the compiled step compiles): both guidance passes as one batch."""
        x = self.lite_hybrid(tokens, mask)
        if null_labels is None:
            return self.transformer(x, labels, mask, positions=predict), None
        h_cond, h_uncond = self.transformer(
            torch.cat([x, x]),
            torch.cat([labels, null_labels]),
            torch.cat([mask, mask]),
            positions=predict.repeat(2, 1),
        ).chunk(2)
        return h_cond, h_uncond

    def enable_compiled_step(self, **compile_kwargs) -> None:
        """Run sampling's backbone steps under ``torch.compile`` (``fullgraph=True``: a graph break is an error).

        - Exact sampling's step (LiteHybrid and transformer, both guidance passes, the last block only at the rows
          predicted) as one graph.
        - With a :class:`SamplingCache`, its cached passes (``EARTransformer.forward_partial``). The refreshes'
          full passes and the LiteHybrid run eagerly.

        The rows a step predicts (and those a cached pass recomputes) change from step to step: with torch's
        automatic dynamic shapes (``dynamic`` not given) the first step compiles for its shapes, the next one once
        more with those sizes symbolic, and a handful of graphs (a step of one row gets its own) serve every step
        and step count.

        On a GPU, pass ``mode="reduce-overhead"`` for CUDA graphs, and load the pipeline in bf16
        (``dtype=torch.bfloat16``). Other keyword arguments go to ``torch.compile``.

        EAR's backbone only: MAR's (:class:`MARTransformer`) raises a TypeError. Its encoder's sequence holds the
        tokens known so far and it checks its inputs by reading tensors, which one graph cannot hold.
        """
        if not isinstance(self.transformer, EARTransformer):
            raise TypeError(
                f"ParScaleEARPipeline.enable_compiled_step: the compiled step is for EARTransformer backbones; this "
                f"pipeline's is a {type(self.transformer).__name__}, whose encoder changes length with the tokens "
                "known. Sample it eagerly (with or without a SamplingCache)."
            )
        compile_kwargs = {"fullgraph": True, **compile_kwargs}
        self._compiled_hidden = torch.compile(self._hidden, **compile_kwargs)
        self._compiled_partial = torch.compile(self.transformer.forward_partial, **compile_kwargs)

    def disable_compiled_step(self) -> None:
        """Back to the eager steps."""
        self._compiled_hidden = self._compiled_partial = None

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int] | list[str] | torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        temperature: float | None = None,
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
            class_labels: class ids or names (see :meth:`get_label_ids`), alone or in a list, tuple, tensor or array of
                any shape (flattened); one image each (times `num_images_per_class`).
            num_inference_steps: autoregressive steps, any integer >= 1; a cosine schedule decides how many tokens each
                predicts (with more steps than tokens some predict nothing, as in EAR; see :meth:`sample_tokens`).
            guidance_scale: classifier-free guidance ``cfg``; EAR's hidden states are mixed before the head as
                ``cfg_k * h_cond + (1 - cfg_k) * h_uncond``, MAR's diffusion head mixes its noise predictions so at
                every diffusion step. 1 disables guidance. A step callback may change `pipe._guidance_scale` for
                the steps after it.
            guidance_schedule: "linear" (EAR / MAR: ``cfg_k`` grows from about 1 towards `guidance_scale` as tokens are
                revealed, ending at ``1 + (cfg - 1) (N - 1) / N``) or "constant" (``cfg_k = cfg``).
            temperature: the head's temperature: the energy head's scales the AdaLN shifts (EAR uses 0.7), the
                diffusion head's the noise of every step (MAR uses 1.0, 0.95 without guidance).
            generator: a ``torch.Generator``, or one per image: each image is then reproducible alone or in any batch.
            num_images_per_class: images per entry of `class_labels`.
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (scaled VAE latents `(B, C, h, w)`).
            return_dict: return an :class:`~diffusers.ImagePipelineOutput` instead of a tuple.
            callback_on_step_end: ``fn(pipe, i, step, tensors) -> dict`` called after each step run with the tensors
                named in `callback_on_step_end_tensor_inputs`; a returned new `tokens` or `latents` replaces the
                tokens, and `pipe._interrupt = True` skips the remaining steps. See :meth:`sample_tokens`.
            callback_on_step_end_tensor_inputs: which tensors the callback receives.
            cache: None (the default) samples exactly, as EAR does; a :class:`SamplingCache` turns on LazyMAR's token
                and condition caches: faster, slightly different images.

        `num_inference_steps`, `guidance_scale`, `guidance_schedule` and `temperature` left None take the pipeline's
        :attr:`sampling_defaults`: EAR's 64, 3.0, "linear" and 0.7, unless the pipeline saved others.

        Returns:
            :class:`~diffusers.ImagePipelineOutput` with `.images`, or a tuple `(images,)`.
        """
        # 1. Check inputs; `class_ids` raises for labels it cannot map.
        ids = self.class_ids(class_labels)
        # (steps, guidance, schedule, temperature), the pipeline's defaults for those left None.
        sampling = self.with_sampling_defaults(num_inference_steps, guidance_scale, guidance_schedule, temperature)
        tensor_inputs = callback_on_step_end_tensor_inputs
        per_call = (num_images_per_class, output_type, generator)  # what only __call__ takes
        self.check_inputs(*sampling, tensor_inputs, cache, *per_call, num_class_labels=len(ids))
        ids = [i for i in ids for _ in range(num_images_per_class)]

        # 2. Prepare all randomness up front, image i's from its own generator: its order, then a noise per token.
        batch, device, n, head = len(ids), self._execution_device, self.grid_size**2, self.energy_head
        orders = torch.argsort(uniform(batch, (n,), generator, device), dim=1)
        noise = head.noise_from_uniform(uniform(batch, (n, *head.noise_shape), generator, device))

        # 3. Masked autoregressive sampling of the tokens.
        class_ids = torch.tensor(ids, device=device)
        tokens = self._sample_tokens(class_ids, orders, noise, *sampling, callback_on_step_end, tensor_inputs, cache)

        # 4. Decode and post-process.
        images = tokens_to_latents(tokens, self.grid_size)
        if output_type != "latent":
            with eval_mode(self.vae):
                images = self.image_processor.postprocess(self.decode_latents(images), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

"""LazyMAR's training-free sampling caches (Yan et al., ICCV 2025): the user's :class:`SamplingCache` settings
and :class:`SamplingCacheState`, what the caches hold during one run and the backbone step that uses them.

Both backbones offer the same cached methods: ``token_cache(full_layers)`` (an empty cache),
``forward(..., cache=...)`` (a full pass that fills it), ``forward_partial`` (a step through it) and
``token_cache_depth`` (the limit of `full_layers`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .models._checks import check_float, check_int
from .models.ear_transformer import EARTransformer, TokenCache, gather_rows
from .models.lite_hybrid import LiteHybrid
from .models.mar_transformer import MARTokenCache, MARTransformer


@dataclass(frozen=True)
class SamplingCache:
    r"""LazyMAR's training-free sampling caches (Yan et al., ICCV 2025); pass as ``pipe(..., cache=...)``.

    Sampling is exact without it (``cache=None``, the default). Every `refresh_every` steps (and at the
    first step) the backbone runs in full, as exact sampling does, and fills the caches; the steps
    between reuse them. By default `refresh_every` follows the step count (:meth:`refresh_every_at`):
    ``min(8, max(1, num_inference_steps // 2))``, so at least two full passes at 8 steps or more
    (8 steps: at steps 0 and 4; 16 or more: every 8th):

    - **token cache**: the first `full_layers` blocks run over every position; above them only the
      tokens to predict, the tokens decoded since the last pass and the `token_share` of the other
      positions whose features changed most are recomputed; the rest reuse their cached keys and values.
    - **condition cache**: with guidance, the unconditional pass is skipped and the unconditional hidden
      states are the conditional ones plus the difference ``h_uncond - h_cond`` of the last refresh.

    On MAR's backbone (:class:`~parscale_ear_hf.models.mar_transformer.MARTransformer`) the token cache works
    in both of its stacks, each as above. The encoder (buffer + known tokens) appends the tokens decoded since
    the last pass to its sequence and computes them; its other positions (buffer, tokens known before) run the
    first `full_layers` blocks, and above them only the `token_share` that changed most, the rest keeping
    their keys, values and output. The decoder (buffer + N) recomputes the tokens to predict, those decoded
    since the last pass and the `token_share` of the others. `full_layers` must stay below the shallower
    stack's depth. The condition cache is the same as on EAR's backbone; MAR's diffusion head then gets the
    conditional ``z`` and ``z`` plus the cached difference, and mixes its noise predictions as without a cache.

    This follows LazyMAR's design (`models/mar_cache.py`, `models/basic.py`), with these differences: LazyMAR's
    encoder runs only the buffer and the new tokens from its first block on, where ours also runs the first
    `full_layers` blocks over the known tokens, so that `token_share` chooses there as well (and
    ``token_share=1`` is exact); LazyMAR picks the decoder's tokens by the change of one block's values (its
    fourth) and keeps a share that falls with the step (``RETAIN_RATIO_SCHEDULE``), ours by the change of
    block `full_layers`'s input, with a fixed share; LazyMAR refreshes at each of its first 5 steps and
    then every 9th, ours at the first and every `refresh_every`-th; LazyMAR adds its guidance difference
    before the decoder's final norm, ours to the hidden states. LazyMAR also reuses MLP outputs inside
    MAR's diffusion head across the head's denoising steps; that is not done here: the head runs in full.

    Args:
        token_cache: use the token cache.
        token_share: share of the positions that are neither predicted nor newly decoded that the
            token cache recomputes anyway, those whose features changed most; in [0, 1] (1: exact up to
            float rounding).
        condition_cache: use the condition cache (only acts with guidance, `guidance_scale` > 1).
        refresh_every: a full pass every this many steps (1: every step, which is exact sampling up to
            float rounding); None (the default): by the step count, see :meth:`refresh_every_at`.
        full_layers: blocks computed over every position by the token cache, >= 1 and below the
            backbone's depth (on MAR, of each stack, so below the shallower one); the last of them says which
            positions changed most.

    The defaults were chosen on the demo model at 16 steps, batch 16 (1,000 samples, demo-FID against the
    held-out split): they cost no measurable quality there and skip the most work of the settings tried;
    the benchmark's `quality` section measures them at 8 to 64 steps. A fixed ``refresh_every=8`` refreshes
    only at the first of 8 steps, which lost quality there (issue 28), hence the rule. They have not been measured
    on MAR.
    """

    token_cache: bool = True
    token_share: float = 0.1
    condition_cache: bool = True
    refresh_every: int | None = None
    full_layers: int = 1

    def __post_init__(self):
        for name in ("token_cache", "condition_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SamplingCache: `{name}` must be True or False, got {getattr(self, name)!r}.")
        check_float("SamplingCache", "token_share", self.token_share, 0.0, 1.0)
        every = self.refresh_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(
                f"SamplingCache: `refresh_every` must be None (by the step count) or an integer >= 1, got {every!r}."
            )
        check_int("SamplingCache", "full_layers", self.full_layers, 1)

    def refresh_every_at(self, num_inference_steps: int) -> int:
        """The steps between full passes when sampling `num_inference_steps` steps: `refresh_every` if set,
        else ``min(8, max(1, num_inference_steps // 2))`` (8 steps: 4; 16 steps or more: 8)."""
        check_int("SamplingCache.refresh_every_at", "num_inference_steps", num_inference_steps, 1)
        if self.refresh_every is not None:
            return self.refresh_every
        return min(8, max(1, num_inference_steps // 2))

    @property
    def enabled(self) -> bool:
        """Whether any cache is on (with both off, sampling is exact)."""
        return self.token_cache or self.condition_cache


def check_cache(cache, transformer: EARTransformer | MARTransformer) -> None:
    """Raise naming `cache` unless it is None or a :class:`SamplingCache` that fits the backbone `transformer`."""
    if cache is None:
        return
    if not isinstance(cache, SamplingCache):
        raise TypeError(
            f"ParScaleEARPipeline: `cache` must be a SamplingCache or None (exact sampling), got {cache!r}."
        )
    depth = transformer.token_cache_depth
    if cache.token_cache and cache.full_layers >= depth:
        raise ValueError(
            f"ParScaleEARPipeline: `cache.full_layers` is {cache.full_layers} but the token cache of this "
            f"{type(transformer).__name__} works on stacks of {depth} blocks (`token_cache_depth`); it needs "
            f"full_layers in [1, {depth - 1}] (or token_cache=False)."
        )


def conditional_rows(rows: int, batch: int, device) -> torch.Tensor:
    """The conditional rows `(rows // 2,)` of a backbone pass over both guidance passes of `batch` images: its
    `rows` are streams (ParScale's, one without) of `batch` conditional then `batch` unconditional rows."""
    streams = rows // (2 * batch)
    return (torch.arange(streams, device=device)[:, None] * 2 * batch + torch.arange(batch, device=device)).flatten()


class SamplingCacheState:
    """What the caches of one :class:`SamplingCache` hold during one sampling run, and the step that uses them.

    Args:
        cache: the settings.
        lite_hybrid, transformer: the pipeline's components (already in eval mode).
        num_inference_steps: the run's step count, which sets the default `refresh_every`.
        partial_pass: what runs the cached passes: the backbone's ``forward_partial`` (the default) or a compiled
            version of it (:meth:`ParScaleEARPipeline.enable_compiled_step`).
    """

    def __init__(
        self,
        cache: SamplingCache,
        lite_hybrid: LiteHybrid,
        transformer: EARTransformer | MARTransformer,
        num_inference_steps: int,
        partial_pass: Callable | None = None,
    ):
        self.cache, self.lite_hybrid, self.transformer = cache, lite_hybrid, transformer
        self.partial_pass = partial_pass or transformer.forward_partial
        self.refresh_every = cache.refresh_every_at(num_inference_steps)
        self.tokens: TokenCache | MARTokenCache | None = None  # the backbone's, from its `token_cache`
        self.uncond_minus_cond: torch.Tensor | None = None  # (B, N, D) float32, from the last refresh
        self.last_refresh = -1
        self.layout: tuple | None = None  # which passes filled the caches; another layout refreshes

    def invalidate(self) -> None:
        """The tokens were replaced (by a step callback): the caches are stale, refresh at the next step."""
        self.layout = None

    def hidden(
        self,
        step: int,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        null_labels: torch.Tensor | None,
        recompute: torch.Tensor,
        predict: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states `(B, T, D)` at `predict` `(B, T)` of the conditional pass and, given `null_labels`,
        of the unconditional one (None otherwise), through the caches; the caller mixes them.

        `recompute` `(B, M)` starts with `predict` and goes on with the positions decoded since the last pass.
        """
        cache, transformer = self.cache, self.transformer
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
        if self.layout != layout or step - self.last_refresh >= self.refresh_every:
            self.tokens = transformer.token_cache(cache.full_layers) if cache.token_cache else None
            if guided and cache.condition_cache:
                # Both passes as one batch (fewer, larger calls); the token cache keeps the conditional rows.
                both_rows = (torch.cat([x, x]), torch.cat([labels, null_labels]), torch.cat([mask, mask]))
                h, h_uncond = transformer(*both_rows, cache=self.tokens).chunk(2)
                if self.tokens is not None:
                    self.tokens.keep_rows(conditional_rows(self.tokens.rows, len(labels), h.device))
                self.uncond_minus_cond = h_uncond.float() - h.float()
            else:
                h = transformer(*rows, cache=self.tokens)
            self.layout, self.last_refresh = layout, step
            z = gather_rows(h, predict.repeat(2, 1) if both else predict)
        elif cache.token_cache:
            z = self.partial_pass(
                *rows,
                cache=self.tokens,
                # A copy, also of one pass's rows: a compiled pass would recompile for each offset of the slice.
                positions=recompute.repeat(1 + both, 1),
                num_out=predict.shape[1],
                extra_share=cache.token_share,
            )
        else:
            z = gather_rows(transformer(*rows), predict)
        if not guided:
            return z, None
        if both:
            return z.chunk(2)
        return z, z.float() + gather_rows(self.uncond_minus_cond, predict)

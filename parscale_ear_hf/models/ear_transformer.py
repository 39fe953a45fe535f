"""EAR's masked autoregressive backbone, widened with ParScale parallel streams.

One bidirectional transformer runs over ``buffer_size`` leading positions (holding the class
embedding and, with ParScale, a per-stream prefix) followed by the N token positions. Unknown
tokens are replaced by a learned mask token; the model returns one hidden vector per token
position, which the energy head turns into a token.

ParScale (Qwen, "Parallel Scaling Law", 2025): the batch is replicated ``parscale_n`` = P
times, each copy gets its own learnable prefix, the shared backbone runs all copies as one
batch, and the P hidden states of every position are mixed with softmax weights from a small
MLP, smoothed as ``w * (1 - eps) + eps / P``. With P = 1 none of this exists.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_divisible, check_float, check_int


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents `(B, C, h, w)` -> tokens `(B, h*w, C)` in raster order."""
    return latents.flatten(2).transpose(1, 2)


def tokens_to_latents(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Tokens `(B, N, C)` in raster order -> VAE latents `(B, C, grid_size, grid_size)`."""
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, grid_size, grid_size)


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`x` `(B, N, ...)` at `positions` `(B, T)` -> `(B, T, ...)`."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_dropout: float, proj_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: list | None = None,
        positions: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` `(B, n, D)`. With `kv_cache` (a list): a full pass (`positions` None) stores this layer's keys
        and values `(B, heads, L, D / heads)` in it; a partial pass over the sequence positions `positions`
        `(B, n)` writes their keys and values into the cache and attends to all L cached positions. With
        `queries` `(B, T)` (rows of `x`), only those rows attend: the output is `(B, T, D)`; keys and values
        still come from every row."""
        b, n, d = x.shape
        shape = (b, -1, self.num_heads, d // self.num_heads)
        if queries is None:
            q, k, v = self.qkv(x).view(b, n, 3, *shape[2:]).permute(2, 0, 3, 1, 4)
        else:  # the query rows of the qkv projection, and keys and values of all rows: the same weights
            q = F.linear(gather_rows(x, queries), self.qkv.weight[:d], self.qkv.bias[:d]).view(shape).transpose(1, 2)
            k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).view(b, n, 2, *shape[2:]).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            if positions is None:
                kv_cache[:] = [k.contiguous(), v.contiguous()]
            else:
                index = positions[:, None, :, None].expand(-1, self.num_heads, -1, k.shape[-1])
                kv_cache[0].scatter_(2, index, k)
                kv_cache[1].scatter_(2, index, v)
                k, v = kv_cache
        # Bidirectional: every position sees every position; what a masked position "sees" of
        # other unknown tokens is only the shared mask token, never their values.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, -1, d)))


# `mlp_activation` values: EAR's timm `Block` uses the exact GELU; the shipped demo models the tanh one.
MLP_ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


class _Block(nn.Module):
    """timm's ViT ``Block`` (pre-norm attention and MLP, LayerNorm eps 1e-6), as EAR and MAR use it: `dropout`
    is timm's `proj_drop` (attention output and MLP), `attn_dropout` its `attn_drop` (default: `dropout`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        mlp_activation: str,
        attn_dropout: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, dropout if attn_dropout is None else attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(approximate=MLP_ACTIVATIONS[mlp_activation]),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: list | None = None,
        positions: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x` `(B, n, D)` -> `(B, n, D)`, or `(B, T, D)` at the rows `queries` `(B, T)` only (see `_Attention`)."""
        attended = self.attn(self.norm1(x), kv_cache, positions, queries)
        x = (x if queries is None else gather_rows(x, queries)) + attended
        return x + self.mlp(self.norm2(x))


class TokenCache:
    """LazyMAR's token cache (Yan et al., ICCV 2025) over one stack of blocks, for one sampling run.

    A full pass (:meth:`run`) computes every position and keeps what a partial pass needs. In a partial
    pass (:meth:`run_partial`) the first `full_layers` blocks still run over every position; their output
    (the "probe") says how much each position changed since its features were last computed. Above them
    only the positions that must be are recomputed, plus the share of the others that changed most; they
    attend to the other positions' keys and values as earlier passes left them. EAR's backbone has one
    stack (:class:`EARTransformer`), MAR's two (:class:`~.mar_transformer.MARTokenCache`).

    Attributes:
        full_layers: blocks computed over every position at every step.
        probe: `(rows, L, D)`, input of block `full_layers` where it was last computed (None until a full pass).
        kv: per block from `full_layers` on, `[keys, values]` `(rows, heads, L, D / heads)`.
    """

    def __init__(self, full_layers: int):
        self.full_layers = full_layers
        self.probe: torch.Tensor | None = None
        self.kv: list[list] = []

    @property
    def rows(self) -> int | None:
        """Batch rows the cache holds (B times the streams, times 2 with both guidance passes), or None."""
        return None if self.probe is None else self.probe.shape[0]

    def check_rows(self, owner: str, rows: int) -> None:
        """Raise unless a full pass filled the cache with `rows` batch rows."""
        if self.rows != rows:
            raise ValueError(
                f"{owner}: the cache holds {self.rows} batch rows, this pass {rows}; "
                "fill it with a full `forward(..., cache=cache)` of the same rows first."
            )

    def run(self, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        """`blocks` over every position of `h` `(rows, L, D)`, as without a cache, keeping the probe and the
        keys and values of the blocks from `full_layers` on."""
        self.kv = [[] for _ in blocks[self.full_layers :]]
        for i, block in enumerate(blocks):
            if i < self.full_layers:
                h = block(h)
                continue
            if i == self.full_layers:
                self.probe = h.clone()
            h = block(h, self.kv[i - self.full_layers])
        return h

    def run_partial(
        self, blocks: nn.ModuleList, h: torch.Tensor, must: torch.Tensor, share: float, num_out: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`blocks` over `h` `(rows, L, D)` recomputing above `full_layers` only the positions `must` `(rows, M)`
        and ``round(share * (L - M))`` others, those whose probe changed most (cosine distance). With `num_out`,
        the last block's output is wanted only at the first `num_out` of `must`: it computes its queries and MLP
        there alone (its keys and values at every recomputed position, for the cache).

        Returns:
            The blocks' output `(rows, M + extra, D)` at the recomputed positions (`(rows, num_out, D)` with
            `num_out`), and those positions `(rows, M + extra)`: `must` first, in its order.
        """
        for block in blocks[: self.full_layers]:
            h = block(h)
        change = 1 - F.cosine_similarity(h.float(), self.probe.float(), dim=-1)
        change.scatter_(1, must, -1.0)  # below any cosine distance: never picked twice
        num_extra = round(share * (h.shape[1] - must.shape[1]))
        chosen = torch.cat([must, change.topk(num_extra, dim=1, sorted=False).indices], dim=1)
        index = chosen.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        x = h.gather(1, index)
        self.probe.scatter_(1, index, x)
        upper = blocks[self.full_layers :]
        for i, (kv, block) in enumerate(zip(self.kv, upper)):
            queries = None
            if num_out is not None and i == len(upper) - 1:
                queries = torch.arange(num_out, device=x.device).expand(x.shape[0], -1)
            x = block(x, kv, chosen, queries)
        return x, chosen

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` `(rows_kept,)` of the probe and of every block's keys and values."""
        self.probe = self.probe[index]
        self.kv = [[t[index] for t in kv] for kv in self.kv]

    def grow(self, num: int) -> None:
        """Append `num` positions (zeros until a pass computes them) to the probe and every block's keys and
        values: for a sequence that gets longer between passes, as MAR's encoder does."""
        self.probe = torch.cat([self.probe, self.probe.new_zeros(self.rows, num, self.probe.shape[-1])], dim=1)
        for kv in self.kv:
            kv[:] = [torch.cat([t, t.new_zeros(*t.shape[:2], num, t.shape[-1])], dim=2) for t in kv]


class MaskedTrainingMixin:
    """What MAR and EAR share in training, for a backbone whose config has `num_classes`, `grid_size`,
    `mask_ratio_min`, `mask_ratio_std` and `class_dropout_prob`: the null class, the training mask and the
    label dropout. The caller draws both and passes them to ``forward`` (MAR draws them inside its forward)."""

    @property
    def null_class(self) -> int:
        """Index of the learned unconditional class."""
        return self.config.num_classes

    def sample_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training mask: a random order per image and a mask ratio from the truncated normal.

        Returns:
            `(batch_size, N)` bool, True at the positions to predict. One ratio per batch, as in
            MAR / EAR, and at least one masked token.
        """
        n = self.num_tokens
        low, std = self.config.mask_ratio_min, self.config.mask_ratio_std
        # Inverse-CDF draw of N(1, std) truncated to [low, 1]: exact and generator-driven.
        normal = torch.distributions.Normal(1.0, std)
        cdf_low, cdf_high = normal.cdf(torch.tensor(low)), normal.cdf(torch.tensor(1.0))
        u = torch.rand((), generator=generator)
        ratio = normal.icdf(cdf_low + u * (cdf_high - cdf_low)).clamp(low, 1.0)
        num_masked = max(1, math.ceil(n * ratio.item()))
        orders = torch.argsort(torch.rand(batch_size, n, generator=generator), dim=1)
        mask = torch.zeros(batch_size, n, dtype=torch.bool)
        mask.scatter_(1, orders[:, :num_masked], True)
        return mask.to(self.device)

    def drop_labels(self, class_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability `class_dropout_prob` (training)."""
        drop = torch.rand(class_labels.shape, generator=generator) < self.config.class_dropout_prob
        return torch.where(drop.to(class_labels.device), torch.full_like(class_labels, self.null_class), class_labels)

    @property
    def num_tokens(self) -> int:
        """N, the token positions: ``grid_size**2``."""
        return self.config.grid_size**2


class EARTransformer(MaskedTrainingMixin, AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""Bidirectional masked-AR backbone over ``buffer_size + grid_size**2`` positions.

    Args:
        in_channels: channels C of a token (the VAE's `latent_channels`).
        grid_size: side of the token grid; N = grid_size**2 token positions.
        num_classes: number of classes; index `num_classes` is the learned null class used for
            classifier-free guidance.
        hidden_size, num_layers, num_heads, mlp_ratio: transformer shape (EAR-B: 768, 24, 12, 4).
        buffer_size: leading positions holding the class embedding (and stream prefixes).
        class_dropout_prob: probability of replacing a label by the null class in training.
        dropout: dropout of attention and MLP in training.
        mask_ratio_min: lower end of the training mask ratio; the ratio is drawn from a normal
            (mean 1, sd `mask_ratio_std`) truncated to [mask_ratio_min, 1].
        mask_ratio_std: see above.
        parscale_n: number P of parallel streams.
        parscale_attn_smooth: label smoothing eps of the stream-aggregation weights.
        mlp_activation: "gelu" (exact, EAR's) or "gelu_tanh" (the shipped demo models').

    In training, diffusers' ``enable_gradient_checkpointing()`` keeps only each block's input and
    recomputes the block in the backward pass (EAR's ``--grad_checkpointing``): less memory, the same
    loss and gradients, about one more forward pass of compute.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        grid_size: int = 16,
        num_classes: int = 1000,
        hidden_size: int = 768,
        num_layers: int = 24,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        buffer_size: int = 64,
        class_dropout_prob: float = 0.1,
        dropout: float = 0.1,
        mask_ratio_min: float = 0.7,
        mask_ratio_std: float = 0.25,
        parscale_n: int = 1,
        parscale_attn_smooth: float = 0.01,
        mlp_activation: str = "gelu",
    ):
        super().__init__()
        for name in (
            "in_channels",
            "grid_size",
            "num_classes",
            "hidden_size",
            "num_layers",
            "num_heads",
            "buffer_size",
            "parscale_n",
        ):
            check_int("EARTransformer", name, locals()[name])
        check_divisible("EARTransformer", "hidden_size", hidden_size, num_heads, "num_heads")
        check_float("EARTransformer", "mlp_ratio", mlp_ratio, 1e-3, 64.0)
        check_float("EARTransformer", "class_dropout_prob", class_dropout_prob, 0.0, 1.0, high_inclusive=False)
        check_float("EARTransformer", "dropout", dropout, 0.0, 1.0, high_inclusive=False)
        check_float("EARTransformer", "mask_ratio_min", mask_ratio_min, 0.0, 1.0)
        check_float("EARTransformer", "mask_ratio_std", mask_ratio_std, 1e-6, 10.0)
        check_float("EARTransformer", "parscale_attn_smooth", parscale_attn_smooth, 0.0, 1.0)
        if mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"EARTransformer: `mlp_activation` must be one of {sorted(MLP_ACTIVATIONS)}, got {mlp_activation!r}."
            )

        self.gradient_checkpointing = False
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)
        self.token_proj = nn.Linear(in_channels, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embedding = nn.Parameter(torch.zeros(1, buffer_size + self.num_tokens, hidden_size))
        self.blocks = nn.ModuleList(
            [_Block(hidden_size, num_heads, mlp_ratio, dropout, mlp_activation) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        if parscale_n > 1:
            self.stream_prefix = nn.Parameter(torch.zeros(parscale_n, buffer_size, hidden_size))
            self.stream_aggregator = nn.Sequential(
                nn.Linear(parscale_n * hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, parscale_n)
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.mask_token, self.pos_embedding):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        if self.config.parscale_n > 1:
            nn.init.trunc_normal_(self.stream_prefix, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        mask: torch.Tensor,
        cache: TokenCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden vectors of all token positions, or of `positions` only.

        Args:
            tokens: `(B, N, C)` latent tokens; values at masked positions are ignored.
            class_labels: `(B,)` long, in [0, num_classes]; `num_classes` is the null class.
            mask: `(B, N)` bool, True where the token is unknown.
            cache: a :class:`TokenCache` to fill (sampling), so that :meth:`forward_partial` can reuse
                this pass; None in training and exact sampling.
            positions: `(B, T)` token positions (in [0, N)) whose hidden vectors to return (exact sampling:
                the tokens to predict), or None for all. The last block then computes its attention queries,
                MLP and the final norm only there (its keys and values still come from every position): the
                same vectors up to float rounding. Not with `cache`.

        Returns:
            `(B, N, hidden_size)`, or `(B, T, hidden_size)` in the order of `positions`: the (stream-aggregated)
            hidden vectors.
        """
        h = self.embed(tokens, class_labels, mask)
        buf = self.config.buffer_size
        if cache is not None:
            if positions is not None:
                raise ValueError("EARTransformer: `positions` must be None when a `cache` is filled (a full pass).")
            h = cache.run(self.blocks, h)
        else:
            last = len(self.blocks) - (positions is not None)
            for block in self.blocks[:last]:
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    h = self._gradient_checkpointing_func(block, h)
                else:
                    h = block(h)
            if positions is not None:  # streams are batch rows
                return self.mix_streams(
                    self.norm(self.blocks[-1](h, queries=positions.repeat(self.config.parscale_n, 1) + buf)),
                    tokens.shape[0],
                )
        return self.mix_streams(self.norm(h)[:, buf:], tokens.shape[0])

    def token_cache(self, full_layers: int) -> TokenCache:
        """An empty token cache for :meth:`forward` and :meth:`forward_partial` (the same method on both backbones)."""
        return TokenCache(full_layers)

    @property
    def token_cache_depth(self) -> int:
        """Blocks in the stack the token cache works on: its `full_layers` must stay below this."""
        return self.config.num_layers

    def forward_partial(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        mask: torch.Tensor,
        cache: TokenCache,
        positions: torch.Tensor,
        num_out: int,
        extra_share: float,
    ) -> torch.Tensor:
        """LazyMAR's token-cached pass: hidden vectors of ``positions[:, :num_out]`` only.

        The first `cache.full_layers` blocks run over every position. Above them only these positions
        are recomputed: `positions` (those that must be: the tokens to predict, then those whose input
        changed) and the `extra_share` of the others (buffer or tokens) whose probe changed most; the rest
        reuse the keys and values that the cache holds. Not exact: see :class:`TokenCache`.

        Args:
            tokens, class_labels, mask: as in :meth:`forward`; the batch rows must match the cache's.
            cache: a :class:`TokenCache` filled by a :meth:`forward` of the same batch rows.
            positions: `(B, M)` token positions (in [0, N)) to recompute; the first `num_out` are returned.
            num_out: how many of `positions` to return.
            extra_share: share in [0, 1] of the other positions to recompute too, chosen by the probe
                (1: all of them, a full pass up to float rounding).

        Returns:
            `(B, num_out, hidden_size)`, in the order of ``positions[:, :num_out]``.
        """
        h = self.embed(tokens, class_labels, mask)
        cache.check_rows("EARTransformer.forward_partial", h.shape[0])
        must = positions.repeat(self.config.parscale_n, 1) + self.config.buffer_size  # streams are batch rows
        x, _ = cache.run_partial(self.blocks, h, must, extra_share, num_out)
        return self.mix_streams(self.norm(x), tokens.shape[0])

    def embed(self, tokens: torch.Tensor, class_labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Input sequence `(P * B, buffer_size + N, D)`: class (and stream) prefix, then tokens or the mask token."""
        b = tokens.shape[0]
        p, buf = self.config.parscale_n, self.config.buffer_size
        x = self.token_proj(tokens)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        prefix = self.class_embedding(class_labels).unsqueeze(1).expand(b, buf, -1)
        if p > 1:
            # (P, B, buf, D): stream s of every image gets prefix s; streams become batch rows.
            prefix = prefix.unsqueeze(0) + self.stream_prefix.unsqueeze(1)
            prefix = prefix.reshape(p * b, buf, -1)
            x = x.repeat(p, 1, 1)
        return torch.cat([prefix, x], dim=1) + self.pos_embedding

    def mix_streams(self, h: torch.Tensor, batch: int) -> torch.Tensor:
        """`(P * B, n, D) -> (B, n, D)`: the streams' aggregation, or nothing with P = 1."""
        p = self.config.parscale_n
        if p > 1:
            h = self.aggregate_streams(h.view(p, batch, h.shape[1], -1))
        return h

    def stream_weights(self, streams: torch.Tensor) -> torch.Tensor:
        """Smoothed softmax weights `(B, N, P)` of `streams` `(P, B, N, D)`, float32 whatever the streams' dtype
        (as ParScale's): each row sums to one within float32 rounding."""
        p = self.config.parscale_n
        eps = self.config.parscale_attn_smooth
        logits = self.stream_aggregator(streams.permute(1, 2, 0, 3).flatten(2))
        weights = logits.float().softmax(dim=-1)
        return weights * (1 - eps) + eps / p

    def aggregate_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """Weighted sum over the P streams: `(P, B, N, D) -> (B, N, D)`, in the streams' dtype.

        As ParScale, the float32 weights multiply the streams and the sum is taken in float32 (products and
        sums are not autocast ops, so autocast keeps them so), then rounded once: weights rounded to bf16
        would sum to one only within bf16's unit roundoff 2^-8, a scale error on every hidden vector.
        """
        weights = self.stream_weights(streams)
        return sum(weights[..., s, None] * streams[s] for s in range(self.config.parscale_n)).to(streams.dtype)

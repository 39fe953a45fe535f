"""MAR's masked autoregressive backbone: an MAE-style encoder over the known tokens, a decoder over all positions.

Li et al., "Autoregressive Image Generation without Vector Quantization" (NeurIPS 2024), `models/mar.py`.
The encoder sees ``buffer_size`` leading positions holding the class embedding plus the *known* tokens
only (masked ones are dropped, not replaced); the decoder puts a learned mask token at every unknown
position and runs over all of them; one more learned position embedding is added to its output, the
condition ``z`` of the diffusion head. EAR's backbone (:class:`~.ear_transformer.EARTransformer`) is
MAR's decoder alone, with the mask token at the input; both use the same timm ``Block``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_divisible, check_float, check_int
from .ear_transformer import MaskedTrainingMixin, TokenCache, _Block


class MARTokenCache:
    """LazyMAR's token cache for :class:`MARTransformer`, one sampling run: a :class:`TokenCache` per stack.

    The encoder's sequence grows as tokens become known: a partial pass appends the tokens decoded since the
    last pass, which must be computed, and recomputes the share of the others (buffer and tokens known
    before) whose probe changed most; the rest keep their keys, values and output. The decoder's sequence
    is buffer + N, as EAR's backbone.

    Attributes:
        encoder: over the encoder's sequence: the buffer, then the known tokens in the order they joined it.
        decoder: over the buffer and the N token positions.
        slots: `(rows, L)` sequence position of each encoder position (buffer i -> i, token n -> buffer + n).
        encoded: `(rows, L, decoder_hidden_size)` the encoder's output there as last computed (encoder_norm
            and decoder_proj applied): the decoder's input at the known positions.
    """

    def __init__(self, full_layers: int):
        self.encoder, self.decoder = TokenCache(full_layers), TokenCache(full_layers)
        self.slots: torch.Tensor | None = None
        self.encoded: torch.Tensor | None = None

    @property
    def rows(self) -> int | None:
        """Batch rows the cache holds, or None before a full pass."""
        return self.encoder.rows

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` `(rows_kept,)` of both stacks' caches, `slots` and `encoded`."""
        self.encoder.keep_rows(index)
        self.decoder.keep_rows(index)
        self.slots, self.encoded = self.slots[index], self.encoded[index]


class MARTransformer(MaskedTrainingMixin, AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""MAR's backbone: ``(tokens, labels, mask) -> z``, one condition vector per token position.

    Args:
        in_channels: channels C of a token (the VAE's `latent_channels`; MAR: 16).
        grid_size: side of the token grid; N = grid_size**2 token positions.
        num_classes: number of classes; index `num_classes` is the learned null class (MAR's `fake_latent`).
        encoder_hidden_size, encoder_num_layers, encoder_num_heads: the encoder (MAR-B: 768, 12, 12).
        decoder_hidden_size, decoder_num_layers, decoder_num_heads: the decoder (MAR-B: 768, 12, 12); its
            width is the width of ``z``, the head's `condition_dim`.
        mlp_ratio: hidden width of every block's MLP relative to its width (MAR: 4).
        buffer_size: leading positions holding the class embedding (MAR: 64).
        class_dropout_prob: probability of replacing a label by the null class in training (MAR: 0.1).
        attn_dropout: dropout of the attention weights in training (MAR's `--attn_dropout`, 0.1).
        proj_dropout: dropout after each attention projection and MLP in training (`--proj_dropout`, 0.1).
        mask_ratio_min, mask_ratio_std: the training mask ratio is drawn from a normal (mean 1, sd
            `mask_ratio_std`) truncated to [mask_ratio_min, 1] (MAR: 0.7, 0.25).

    ``enable_gradient_checkpointing()`` recomputes every block in the backward pass (MAR's ``--grad_checkpointing``).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        grid_size: int = 16,
        num_classes: int = 1000,
        encoder_hidden_size: int = 768,
        encoder_num_layers: int = 12,
        encoder_num_heads: int = 12,
        decoder_hidden_size: int = 768,
        decoder_num_layers: int = 12,
        decoder_num_heads: int = 12,
        mlp_ratio: float = 4.0,
        buffer_size: int = 64,
        class_dropout_prob: float = 0.1,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        mask_ratio_min: float = 0.7,
        mask_ratio_std: float = 0.25,
    ):
        super().__init__()
        owner = "MARTransformer"
        for name in ("in_channels", "grid_size", "num_classes", "buffer_size"):
            check_int(owner, name, locals()[name])
        for part in ("encoder", "decoder"):
            for field in ("hidden_size", "num_layers", "num_heads"):
                check_int(owner, f"{part}_{field}", locals()[f"{part}_{field}"])
        check_divisible(owner, "encoder_hidden_size", encoder_hidden_size, encoder_num_heads, "encoder_num_heads")
        check_divisible(owner, "decoder_hidden_size", decoder_hidden_size, decoder_num_heads, "decoder_num_heads")
        check_float(owner, "mlp_ratio", mlp_ratio, 1e-3, 64.0)
        for name in ("class_dropout_prob", "attn_dropout", "proj_dropout"):
            check_float(owner, name, locals()[name], 0.0, 1.0, high_inclusive=False)
        check_float(owner, "mask_ratio_min", mask_ratio_min, 0.0, 1.0)
        check_float(owner, "mask_ratio_std", mask_ratio_std, 1e-6, 10.0)

        self.gradient_checkpointing = False
        positions = buffer_size + grid_size**2
        enc, dec = encoder_hidden_size, decoder_hidden_size

        def blocks(width, depth, heads):
            return nn.ModuleList(
                [_Block(width, heads, mlp_ratio, proj_dropout, "gelu", attn_dropout) for _ in range(depth)]
            )

        self.class_embedding = nn.Embedding(num_classes + 1, enc)
        self.token_proj = nn.Linear(in_channels, enc)
        self.token_norm = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embedding = nn.Parameter(torch.zeros(1, positions, enc))
        self.encoder_blocks = blocks(enc, encoder_num_layers, encoder_num_heads)
        self.encoder_norm = nn.LayerNorm(enc, eps=1e-6)
        self.decoder_proj = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embedding = nn.Parameter(torch.zeros(1, positions, dec))
        self.decoder_blocks = blocks(dec, decoder_num_layers, decoder_num_heads)
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.head_pos_embedding = nn.Parameter(torch.zeros(1, grid_size**2, dec))
        self._init_weights()

    def _init_weights(self) -> None:
        # MAR's: normal(0.02) embeddings, xavier-uniform Linear weights, zero biases (LayerNorms start at 1 / 0).
        for p in (self.mask_token, self.encoder_pos_embedding, self.decoder_pos_embedding, self.head_pos_embedding):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.class_embedding.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        mask: torch.Tensor,
        cache: MARTokenCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MAR's ``forward_mae_encoder`` then ``forward_mae_decoder``: the head's condition at every position,
        or at `positions` only.

        Args:
            tokens: `(B, N, C)` latent tokens; values at masked positions are ignored.
            class_labels: `(B,)` long in [0, num_classes]; `num_classes` is the null class (MAR's
                `fake_latent`). Label dropout is the caller's (:meth:`drop_labels`), as the mask is.
            mask: `(B, N)` bool, True where the token is unknown. Every row masks the same number of
                tokens (MAR drops them from the encoder's sequence; the training mask and every
                sampling step satisfy this).
            cache: a :class:`MARTokenCache` to fill (sampling), so that :meth:`forward_partial` can reuse
                this pass; None in training and exact sampling. The result is the same with or without.
            positions: `(B, T)` token positions whose ``z`` to return (exact sampling: the tokens to predict), or
                None for all. The decoder's last block then computes its queries and MLP only there (keys and
                values from every position): the same vectors up to float rounding. Not with `cache`.

        Returns:
            `(B, N, decoder_hidden_size)` (or `(B, T, ...)` in the order of `positions`): ``z`` for every token
            position, ``diffusion_pos_embed_learned`` added.
        """
        if cache is not None and positions is not None:
            raise ValueError("MARTransformer: `positions` must be None when a `cache` is filled (a full pass).")
        b, n = mask.shape
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"MARTransformer: every row of `mask` must mask the same number of tokens (MAR's encoder drops them), "
                f"got {counts.tolist()}."
            )
        buf = self.config.buffer_size
        x = self.embed(tokens, class_labels)
        keep = torch.cat([mask.new_zeros(b, buf), mask], dim=1).logical_not()
        x = x[keep].view(b, -1, x.shape[-1])
        if cache is None:
            x = self._run(self.encoder_blocks, x)
        else:
            x = cache.encoder.run(self.encoder_blocks, x)
            cache.slots = self.sequence_positions(keep)
        x = self.decoder_proj(self.encoder_norm(x))
        if cache is not None:
            cache.encoded = x
        # Mask tokens at the unknown positions, the encoder's output (in sequence order) at the known ones.
        full = self.mask_token.to(x.dtype).expand(b, buf + n, -1).clone()
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embedding
        if cache is not None:
            x = cache.decoder.run(self.decoder_blocks, x)
        elif positions is not None:
            x = self._run(self.decoder_blocks[:-1], x)
            x = self.decoder_blocks[-1](x, queries=positions + buf)
            return self.decoder_norm(x) + self.head_pos_embedding[0][positions]
        else:
            x = self._run(self.decoder_blocks, x)
        return self.decoder_norm(x)[:, buf:] + self.head_pos_embedding

    def token_cache(self, full_layers: int) -> MARTokenCache:
        """An empty token cache for :meth:`forward` and :meth:`forward_partial` (the same method on both backbones)."""
        return MARTokenCache(full_layers)

    @property
    def token_cache_depth(self) -> int:
        """Blocks in the shallower of the two stacks the token cache works on: its `full_layers` must stay below."""
        return min(self.config.encoder_num_layers, self.config.decoder_num_layers)

    def forward_partial(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        mask: torch.Tensor,
        cache: MARTokenCache,
        positions: torch.Tensor,
        num_out: int,
        extra_share: float,
    ) -> torch.Tensor:
        """LazyMAR's token-cached pass: ``z`` of ``positions[:, :num_out]`` only.

        Encoder: the tokens that became known since the cache's last pass join its sequence and are computed;
        of the others (buffer, tokens known before) the first `cache.full_layers` blocks run over all, the
        blocks above only over the `extra_share` whose probe changed most; the rest keep their cached keys,
        values and output. Decoder: the same over buffer + N, where `positions` must be recomputed. Not
        exact: see :class:`MARTokenCache`.

        Args:
            tokens, class_labels, mask: as in :meth:`forward`; the batch rows must match the cache's, and
                a token known at the cache's last pass stays known.
            cache: a :class:`MARTokenCache` filled by a :meth:`forward` of the same batch rows.
            positions: `(B, M)` token positions (in [0, N)) the decoder recomputes (the tokens to predict,
                then those decoded since the last pass); the first `num_out` are returned.
            num_out: how many of `positions` to return.
            extra_share: share in [0, 1] of the other positions of each stack to recompute too, chosen by
                its probe (1: all of them, a full pass up to float rounding).

        Returns:
            `(B, num_out, decoder_hidden_size)`, in the order of ``positions[:, :num_out]``.
        """
        b, n = mask.shape
        buf = self.config.buffer_size
        cache.encoder.check_rows("MARTransformer.forward_partial", b)
        known = torch.cat([mask.new_zeros(b, buf), mask], dim=1).logical_not()
        cached = torch.zeros_like(known).scatter_(1, cache.slots, True)
        if bool((cached & ~known).any()):
            raise ValueError(
                "MARTransformer.forward_partial: `mask` masks a token that was known at the cache's last pass; "
                "refresh the cache with a full `forward(..., cache=cache)`."
            )
        new = self.sequence_positions(known & ~cached)
        num_cached, num_new = cache.slots.shape[1], new.shape[1]
        slots = torch.cat([cache.slots, new], dim=1)
        rows = torch.arange(b, device=mask.device).unsqueeze(1)
        h = self.embed(tokens, class_labels)[rows, slots]
        cache.encoder.grow(num_new)
        must = torch.arange(num_cached, num_cached + num_new, device=mask.device).expand(b, -1)
        x, chosen = cache.encoder.run_partial(self.encoder_blocks, h, must, extra_share)
        x = self.decoder_proj(self.encoder_norm(x))
        cache.encoded = torch.cat([cache.encoded, cache.encoded.new_zeros(b, num_new, x.shape[-1])], dim=1)
        cache.encoded[rows, chosen] = x
        cache.slots = slots

        full = self.mask_token.to(x.dtype).expand(b, buf + n, -1).clone()
        full[rows, slots] = cache.encoded
        h = full + self.decoder_pos_embedding
        x, _ = cache.decoder.run_partial(self.decoder_blocks, h, positions + buf, extra_share, num_out)
        return self.decoder_norm(x) + self.head_pos_embedding[0][positions[:, :num_out]]

    def embed(self, tokens: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The encoder's input at every position `(B, buffer_size + N, encoder_hidden_size)`: the class embedding
        in the buffer, the projected tokens after it, positions added, normalised (MAR's `z_proj_ln`)."""
        x = self.token_proj(tokens)
        prefix = self.class_embedding(class_labels).unsqueeze(1).expand(x.shape[0], self.config.buffer_size, -1)
        return self.token_norm(torch.cat([prefix.to(x.dtype), x], dim=1) + self.encoder_pos_embedding)

    @staticmethod
    def sequence_positions(selected: torch.Tensor) -> torch.Tensor:
        """`(B, L)` bool with the same count per row -> the selected positions `(B, count)`, ascending."""
        b, length = selected.shape
        return torch.arange(length, device=selected.device).expand(b, -1)[selected].view(b, -1)

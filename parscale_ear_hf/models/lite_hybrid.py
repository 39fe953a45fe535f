"""Lite-Hybrid: coarse (global) + fine (local) enhancement of the visible latent tokens.

Inspired by HART's hybrid tokens, but continuous on both sides: a coarse branch pools the
token grid to a small grid, mixes it globally and brings it back; a fine branch refines each
token from its neighbourhood. Their gated sum is added to the input, so with both gates at
zero (the initial state) or both branches switched off it is the identity, i.e. plain EAR.

Only **visible** tokens are read: masked positions are excluded from the pooling and zeroed
before the local convolution, so the module never leaks the value of a token the model has to
predict. Masked positions are returned unchanged (the backbone replaces them by its mask token).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_bool, check_divisible, check_int


class LiteHybrid(AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""Coarse + fine token module on the ``grid_size x grid_size`` latent token grid.

    Args:
        in_channels: channels C of a token (the VAE's `latent_channels`).
        grid_size: side of the token grid (N = grid_size**2 tokens).
        coarse_grid_size: side of the pooled grid of the coarse branch.
        hidden_dim: width of both branches.
        num_heads: attention heads of the coarse branch's global mixing.
        use_coarse: enable the coarse (global structure) branch.
        use_fine: enable the fine (local detail) branch.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        grid_size: int = 16,
        coarse_grid_size: int = 4,
        hidden_dim: int = 256,
        num_heads: int = 4,
        use_coarse: bool = True,
        use_fine: bool = True,
    ):
        super().__init__()
        for name in ("in_channels", "grid_size", "coarse_grid_size", "hidden_dim", "num_heads"):
            check_int("LiteHybrid", name, locals()[name])
        check_divisible("LiteHybrid", "grid_size", grid_size, coarse_grid_size, "coarse_grid_size")
        if not (use_coarse or use_fine):
            # Plain EAR leaves no parameters, but diffusers reads a model's device and dtype from its
            # tensors and writes no weights file for an empty model: keep one constant.
            self.register_buffer("identity_marker", torch.zeros(()))
        check_divisible("LiteHybrid", "hidden_dim", hidden_dim, num_heads, "num_heads")
        check_bool("LiteHybrid", "use_coarse", use_coarse)
        check_bool("LiteHybrid", "use_fine", use_fine)

        if use_coarse:
            self.coarse_in = nn.Linear(in_channels, hidden_dim)
            self.coarse_pos = nn.Parameter(torch.zeros(1, coarse_grid_size**2, hidden_dim))
            self.coarse_mixer = nn.TransformerEncoderLayer(
                hidden_dim,
                num_heads,
                dim_feedforward=2 * hidden_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.coarse_out = nn.Linear(hidden_dim, in_channels)
            self.coarse_gate = nn.Parameter(torch.zeros(in_channels))
            nn.init.trunc_normal_(self.coarse_pos, std=0.02)
        if use_fine:
            self.fine_local = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels)
            self.fine_mlp = nn.Sequential(
                nn.LayerNorm(in_channels),
                nn.Linear(in_channels, hidden_dim),
                nn.GELU(),
                nn.Linear(hidden_dim, in_channels),
            )
            self.fine_gate = nn.Parameter(torch.zeros(in_channels))

    def _coarse(self, grid: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Masked average pool -> global mixing -> bilinear upsample. `(B, C, h, w) -> (B, N, C)`."""
        g = self.config.coarse_grid_size
        pooled_sum = F.adaptive_avg_pool2d(grid * visible, g)
        pooled_count = F.adaptive_avg_pool2d(visible, g)
        pooled = pooled_sum / pooled_count.clamp_min(1e-6)  # mean over visible tokens only
        tokens = self.coarse_in(pooled.flatten(2).transpose(1, 2)) + self.coarse_pos
        tokens = self.coarse_out(self.coarse_mixer(tokens))
        coarse = tokens.transpose(1, 2).reshape(grid.shape[0], -1, g, g)
        coarse = F.interpolate(coarse, size=grid.shape[-2:], mode="bilinear", align_corners=False)
        return coarse.flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Enhance the visible tokens.

        Args:
            tokens: `(B, N, C)` latent tokens in raster order on the `grid_size x grid_size` grid.
            mask: `(B, N)` bool, True where a token is unknown (masked). None means all visible.

        Returns:
            `(B, N, C)`: enhanced tokens at visible positions, the input at masked positions.
        """
        if not (self.config.use_coarse or self.config.use_fine):
            return tokens
        b, n, c = tokens.shape
        side = self.config.grid_size
        if n != side * side or c != self.config.in_channels:
            raise ValueError(
                f"LiteHybrid: expected tokens (B, {side * side}, {self.config.in_channels}), "
                f"got {tuple(tokens.shape)}."
            )
        visible = torch.ones(b, n, 1, device=tokens.device, dtype=tokens.dtype)
        if mask is not None:
            visible = (~mask).unsqueeze(-1).to(tokens.dtype)
        x = tokens * visible
        grid = x.transpose(1, 2).reshape(b, c, side, side)
        vis_grid = visible.transpose(1, 2).reshape(b, 1, side, side)

        out = tokens
        if self.config.use_coarse:
            out = out + self.coarse_gate * self._coarse(grid, vis_grid)
        if self.config.use_fine:
            local = self.fine_local(grid).flatten(2).transpose(1, 2)
            out = out + self.fine_gate * self.fine_mlp(x + local)
        return torch.where(visible.bool(), out, tokens)

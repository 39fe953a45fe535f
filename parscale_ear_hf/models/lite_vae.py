"""LiteVAE: a variational autoencoder with a wavelet-based, lightweight encoder.

Follows Sadat et al., "LiteVAE: Lightweight and Efficient Variational Autoencoders for Latent
Diffusion Models" (NeurIPS 2024): the encoder starts from a fixed multi-level 2D Haar wavelet
transform, which already does most of the spatial downsampling for free, so the learned part
only needs a small feature extractor per level plus an aggregation network. The decoder is the
standard convolutional VAE decoder of `diffusers`. The public API mirrors
`diffusers.AutoencoderKL` (`encode(x).latent_dist`, `decode(z).sample`, `config.scaling_factor`,
`config.shift_factor`), so the two are interchangeable as a pipeline's `vae`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from ..saving import AtomicSaveMixin
from ._checks import StrictLoadingMixin, check_divisible, check_float, check_int, check_int_sequence


def haar_dwt(x: torch.Tensor) -> torch.Tensor:
    r"""One level of the orthonormal 2D Haar discrete wavelet transform.

    For every 2x2 block `[[a, b], [c, d]]` of each channel the four coefficients are
    `LL = (a + b + c + d) / 2`, `LH = (a - b + c - d) / 2` (high-pass along the width),
    `HL = (a + b - c - d) / 2` (high-pass along the height) and `HH = (a - b - c + d) / 2`.
    The transform is orthonormal, so it preserves energy and `haar_idwt` inverts it exactly.

    Args:
        x (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            Input with even `height` and `width`.

    Returns:
        `torch.Tensor` of shape `(batch_size, 4 * channels, height // 2, width // 2)`: the subbands
        stacked subband-major, `[LL of all channels, LH..., HL..., HH...]`, so `out[:, :channels]`
        is the low-pass image.
    """
    if x.ndim != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"haar_dwt: expected a tensor (B, C, H, W) with even H and W, got shape {tuple(x.shape)}.")
    b, c, h, w = x.shape
    blocks = x.reshape(b, c, h // 2, 2, w // 2, 2)
    top_left, top_right = blocks[:, :, :, 0, :, 0], blocks[:, :, :, 0, :, 1]
    bottom_left, bottom_right = blocks[:, :, :, 1, :, 0], blocks[:, :, :, 1, :, 1]
    ll = (top_left + top_right + bottom_left + bottom_right) / 2
    lh = (top_left - top_right + bottom_left - bottom_right) / 2
    hl = (top_left + top_right - bottom_left - bottom_right) / 2
    hh = (top_left - top_right - bottom_left + bottom_right) / 2
    return torch.cat([ll, lh, hl, hh], dim=1)


def haar_idwt(x: torch.Tensor) -> torch.Tensor:
    r"""Exact inverse of [`haar_dwt`].

    Args:
        x (`torch.Tensor` of shape `(batch_size, 4 * channels, height, width)`):
            Subbands in the subband-major order produced by [`haar_dwt`].

    Returns:
        `torch.Tensor` of shape `(batch_size, channels, 2 * height, 2 * width)`.
    """
    if x.ndim != 4 or x.shape[1] % 4:
        raise ValueError(
            f"haar_idwt: expected a tensor (B, 4 * C, H, W) of Haar subbands, got shape {tuple(x.shape)}."
        )
    b, c4, h, w = x.shape
    ll, lh, hl, hh = x.chunk(4, dim=1)
    # The forward matrix is symmetric and orthonormal, so it is its own inverse.
    top_left = (ll + lh + hl + hh) / 2
    top_right = (ll - lh + hl - hh) / 2
    bottom_left = (ll + lh - hl - hh) / 2
    bottom_right = (ll - lh - hl + hh) / 2
    top = torch.stack([top_left, top_right], dim=-1)
    bottom = torch.stack([bottom_left, bottom_right], dim=-1)
    return torch.stack([top, bottom], dim=3).reshape(b, c4 // 4, 2 * h, 2 * w)


def multilevel_haar_dwt(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    r"""Multi-level 2D Haar DWT: each level transforms the low-pass (LL) image of the level above.

    Args:
        x (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            Input whose `height` and `width` are divisible by `2 ** levels`.
        levels (`int`):
            Number of decomposition levels (at least 1).

    Returns:
        `list[torch.Tensor]` of length `levels`; entry `l - 1` has shape
        `(batch_size, 4 * channels, height // 2**l, width // 2**l)` in [`haar_dwt`]'s layout.
    """
    check_int("multilevel_haar_dwt", "levels", levels)
    factor = 2**levels
    if x.ndim != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(
            f"multilevel_haar_dwt: expected a tensor (B, C, H, W) with H and W divisible by {factor} "
            f"for levels={levels}, got shape {tuple(x.shape)}."
        )
    channels = x.shape[1]
    outputs = []
    for _ in range(levels):
        x = haar_dwt(x)
        outputs.append(x)
        x = x[:, :channels]
    return outputs


class LiteVAEEncoder(nn.Module):
    r"""The learned part of the LiteVAE encoder: per-level feature extractors and an aggregation network.

    Level `l` (1-based) sees the Haar subbands at resolution `H / 2**l`; its features are folded
    to the latent resolution `H / 2**levels` by pixel-unshuffle, which moves space into channels
    without any learned downsampling, and a 1x1 convolution brings them back to the level's width.

    Args:
        in_channels (`int`): Image channels.
        latent_channels (`int`): Channels of the latent; the output has twice as many (mean, logvar).
        levels (`int`): Number of wavelet levels.
        encoder_channels (`tuple[int, ...]`): Width of each level's feature extractor.
        encoder_layers_per_level (`int`): Residual blocks per level's feature extractor.
        aggregation_channels (`int`): Width of the aggregation network.
        aggregation_layers (`int`): Residual blocks of the aggregation network.
        norm_num_groups (`int`): Groups of every GroupNorm.
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int,
        levels: int,
        encoder_channels: tuple[int, ...],
        encoder_layers_per_level: int,
        aggregation_channels: int,
        aggregation_layers: int,
        norm_num_groups: int,
    ):
        super().__init__()
        self.levels = levels

        def resnets(channels: int, num_layers: int) -> nn.ModuleList:
            return nn.ModuleList(
                ResnetBlock2D(in_channels=channels, temb_channels=None, groups=norm_num_groups)
                for _ in range(num_layers)
            )

        self.level_conv_in = nn.ModuleList()
        self.level_resnets = nn.ModuleList()
        self.to_latent_resolution = nn.ModuleList()
        for level, channels in enumerate(encoder_channels, start=1):
            self.level_conv_in.append(nn.Conv2d(4 * in_channels, channels, kernel_size=3, padding=1))
            self.level_resnets.append(resnets(channels, encoder_layers_per_level))
            factor = 2 ** (levels - level)
            if factor == 1:
                # The deepest level is already at latent resolution, and the aggregation 1x1
                # convolution that follows makes another linear projection redundant.
                self.to_latent_resolution.append(nn.Identity())
            else:
                self.to_latent_resolution.append(
                    nn.Sequential(
                        nn.PixelUnshuffle(factor),
                        nn.Conv2d(channels * factor**2, channels, kernel_size=1),
                    )
                )

        self.aggregation_conv_in = nn.Conv2d(sum(encoder_channels), aggregation_channels, kernel_size=1)
        self.aggregation_resnets = resnets(aggregation_channels, aggregation_layers)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, aggregation_channels, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(aggregation_channels, 2 * latent_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            x (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Images with `height` and `width` divisible by `2 ** levels`.

        Returns:
            `torch.Tensor` of shape `(batch_size, 2 * latent_channels, height // 2**levels, width // 2**levels)`:
            the posterior moments, mean then log-variance along channels.
        """
        features = []
        for subbands, conv_in, resnets, to_latent in zip(
            multilevel_haar_dwt(x, self.levels), self.level_conv_in, self.level_resnets, self.to_latent_resolution
        ):
            h = conv_in(subbands)
            for resnet in resnets:
                h = resnet(h, None)
            features.append(to_latent(h))

        h = self.aggregation_conv_in(torch.cat(features, dim=1))
        for resnet in self.aggregation_resnets:
            h = resnet(h, None)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class LiteVAE(AtomicSaveMixin, StrictLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    A VAE with a Haar-wavelet-based lightweight encoder (LiteVAE) and the standard `diffusers` VAE decoder.

    Images are expected in `[-1, 1]`, as for [`~diffusers.AutoencoderKL`], and the API is the same:
    `encode(x).latent_dist` is a [`~diffusers.models.autoencoders.vae.DiagonalGaussianDistribution`],
    `decode(z).sample` is the reconstruction. Latents fed to a generative model are
    `(z - shift_factor) * scaling_factor`, with both factors measured on training data.

    Args:
        in_channels (`int`, *optional*, defaults to 3): Channels of the input image.
        out_channels (`int`, *optional*, defaults to 3): Channels of the reconstructed image.
        sample_size (`int`, *optional*, defaults to 256):
            Training image size; informational, any size divisible by `2 ** levels` is accepted.
        levels (`int`, *optional*, defaults to 4):
            Haar DWT levels; the spatial downsampling factor is `2 ** levels` (256 -> 16 by default).
        latent_channels (`int`, *optional*, defaults to 32): Channels of the latent.
        encoder_channels (`tuple[int, ...]`, *optional*, defaults to `(32, 64, 96, 128)`):
            Width of the feature extractor of each DWT level; one entry per level.
        encoder_layers_per_level (`int`, *optional*, defaults to 2): Residual blocks per level extractor.
        aggregation_channels (`int`, *optional*, defaults to 256): Width of the aggregation network.
        aggregation_layers (`int`, *optional*, defaults to 4): Residual blocks of the aggregation network.
        decoder_block_out_channels (`tuple[int, ...]`, *optional*, defaults to `(128, 256, 256, 512, 512)`):
            Output channels of each decoder block, `levels + 1` entries (every block but the last upsamples by 2).
        decoder_layers_per_block (`int`, *optional*, defaults to 2): Residual layers per decoder block.
        norm_num_groups (`int`, *optional*, defaults to 32): Groups of every GroupNorm.
        scaling_factor (`float`, *optional*, defaults to 1.0):
            Multiplies the latents (after the shift) so they have unit variance for the generative model.
        shift_factor (`float`, *optional*, defaults to 0.0): Subtracted from the latents before scaling.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        sample_size: int = 256,
        levels: int = 4,
        latent_channels: int = 32,
        encoder_channels: tuple[int, ...] = (32, 64, 96, 128),
        encoder_layers_per_level: int = 2,
        aggregation_channels: int = 256,
        aggregation_layers: int = 4,
        decoder_block_out_channels: tuple[int, ...] = (128, 256, 256, 512, 512),
        decoder_layers_per_block: int = 2,
        norm_num_groups: int = 32,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        owner = "LiteVAE"
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("sample_size", sample_size),
            ("levels", levels),
            ("latent_channels", latent_channels),
            ("encoder_layers_per_level", encoder_layers_per_level),
            ("aggregation_channels", aggregation_channels),
            ("aggregation_layers", aggregation_layers),
            ("decoder_layers_per_block", decoder_layers_per_block),
            ("norm_num_groups", norm_num_groups),
        ):
            check_int(owner, name, value)
        check_divisible(owner, "sample_size", sample_size, 2**levels, "2 ** levels")
        check_int_sequence(owner, "encoder_channels", encoder_channels, length=levels)
        check_int_sequence(owner, "decoder_block_out_channels", decoder_block_out_channels, length=levels + 1)
        for index, channels in enumerate(encoder_channels):
            check_divisible(owner, f"encoder_channels[{index}]", channels, norm_num_groups, "norm_num_groups")
        check_divisible(owner, "aggregation_channels", aggregation_channels, norm_num_groups, "norm_num_groups")
        for index, channels in enumerate(decoder_block_out_channels):
            check_divisible(
                owner, f"decoder_block_out_channels[{index}]", channels, norm_num_groups, "norm_num_groups"
            )
        is_number = isinstance(scaling_factor, (int, float)) and not isinstance(scaling_factor, bool)
        if not (is_number and 0 < scaling_factor < float("inf")):
            raise ValueError(f"{owner}: `scaling_factor` must be a finite number > 0, got {scaling_factor!r}.")
        check_float(owner, "shift_factor", shift_factor, float("-inf"), float("inf"))

        self.encoder = LiteVAEEncoder(
            in_channels=in_channels,
            latent_channels=latent_channels,
            levels=levels,
            encoder_channels=tuple(encoder_channels),
            encoder_layers_per_level=encoder_layers_per_level,
            aggregation_channels=aggregation_channels,
            aggregation_layers=aggregation_layers,
            norm_num_groups=norm_num_groups,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=("UpDecoderBlock2D",) * len(decoder_block_out_channels),
            block_out_channels=tuple(decoder_block_out_channels),
            layers_per_block=decoder_layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=True,
        )

    @property
    def spatial_compression(self) -> int:
        """Ratio of image size to latent size, `2 ** levels`."""
        return 2**self.config.levels

    @apply_forward_hook
    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        r"""
        Encode a batch of images into latent posteriors.

        Args:
            x (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Images in `[-1, 1]`; `height` and `width` must be divisible by `2 ** levels`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`~models.modeling_outputs.AutoencoderKLOutput`] instead of a tuple.

        Returns:
            [`~models.modeling_outputs.AutoencoderKLOutput`] or `tuple`: the posterior, a
            `DiagonalGaussianDistribution` whose mean has shape
            `(batch_size, latent_channels, height // 2**levels, width // 2**levels)`.
        """
        factor = self.spatial_compression
        channels = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"LiteVAE.encode: expected images (B, {channels}, H, W) with H and W divisible by {factor}, "
                f"got shape {tuple(x.shape)}."
            )
        posterior = DiagonalGaussianDistribution(self.encoder(x))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Decode a batch of latents into images.

        Args:
            z (`torch.Tensor` of shape `(batch_size, latent_channels, height, width)`):
                Unscaled latents (undo `scaling_factor` / `shift_factor` first).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] or `tuple`: images of shape
            `(batch_size, out_channels, height * 2**levels, width * 2**levels)`.
        """
        channels = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != channels:
            raise ValueError(f"LiteVAE.decode: expected latents (B, {channels}, h, w), got shape {tuple(z.shape)}.")
        sample = self.decoder(z)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        r"""
        Encode and decode a batch of images.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): Input images.
            sample_posterior (`bool`, *optional*, defaults to `False`):
                Whether to decode a sample of the posterior instead of its mode.
            generator (`torch.Generator`, *optional*): Generator for the posterior sample.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] or `tuple`: the reconstruction, same shape as
            `sample` (with `out_channels` channels).
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

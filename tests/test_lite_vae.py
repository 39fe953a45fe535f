import json
import re

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from parscale_ear_hf.models.lite_vae import LiteVAE, haar_dwt, haar_idwt, multilevel_haar_dwt

from conftest import TINY_VAE_CONFIG


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return LiteVAE(**TINY_VAE_CONFIG).eval()


@pytest.fixture
def images():
    # Non-square, so a swapped height / width would show in the shapes.
    return torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------- Haar DWT


def test_haar_round_trip_and_energy():
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    coeffs = haar_dwt(x)
    assert coeffs.shape == (2, 12, 4, 6)
    torch.testing.assert_close(haar_idwt(coeffs), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(coeffs.pow(2).sum(), x.pow(2).sum(), atol=1e-4, rtol=1e-6)


def test_haar_hand_computed_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # LL = (1+2+3+4)/2, LH = (1-2+3-4)/2, HL = (1+2-3-4)/2, HH = (1-2-3+4)/2
    expected = torch.tensor([5.0, -1.0, -2.0, 0.0]).reshape(1, 4, 1, 1)
    torch.testing.assert_close(haar_dwt(x), expected)


def test_haar_constant_image_is_all_low_pass_in_subband_major_order():
    # Two channels with different constants: LL must come first for all channels.
    x = torch.cat([torch.full((1, 1, 4, 4), 1.0), torch.full((1, 1, 4, 4), 3.0)], dim=1)
    coeffs = haar_dwt(x)
    torch.testing.assert_close(coeffs[:, 0], torch.full((1, 2, 2), 2.0))
    torch.testing.assert_close(coeffs[:, 1], torch.full((1, 2, 2), 6.0))
    assert torch.count_nonzero(coeffs[:, 2:]) == 0


def test_multilevel_haar_shapes_and_reconstruction():
    x = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    outputs = multilevel_haar_dwt(x, levels=3)
    assert [tuple(o.shape) for o in outputs] == [(2, 12, 8, 16), (2, 12, 4, 8), (2, 12, 2, 4)]
    # Rebuild from the deepest level upward, using only each level's high-pass bands.
    reconstruction = haar_idwt(outputs[-1])
    for level_output in reversed(outputs[:-1]):
        reconstruction = haar_idwt(torch.cat([reconstruction, level_output[:, 3:]], dim=1))
    torch.testing.assert_close(reconstruction, x, atol=1e-6, rtol=0)


def test_haar_rejects_odd_sizes():
    with pytest.raises(ValueError, match=re.escape("(1, 3, 5, 4)")):
        haar_dwt(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match=re.escape("(1, 3, 8, 6)")):
        multilevel_haar_dwt(torch.zeros(1, 3, 8, 6), levels=2)


# ---------------------------------------------------------------- encode / decode


def test_encode_posterior(vae, images):
    with torch.no_grad():
        output = vae.encode(images)
        assert isinstance(output, AutoencoderKLOutput)
        posterior = output.latent_dist
        assert isinstance(posterior, DiagonalGaussianDistribution)
        assert posterior.mean.shape == (2, 4, 4, 6)
        assert vae.spatial_compression == 4

        torch.testing.assert_close(posterior.mode(), vae.encode(images).latent_dist.mode(), atol=0, rtol=0)
        first = posterior.sample(generator=torch.Generator().manual_seed(3))
        again = posterior.sample(generator=torch.Generator().manual_seed(3))
        other = posterior.sample(generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(first, again, atol=0, rtol=0)
        assert not torch.allclose(first, other)

        (tuple_posterior,) = vae.encode(images, return_dict=False)
        torch.testing.assert_close(tuple_posterior.mean, posterior.mean, atol=0, rtol=0)


def test_decode_and_forward_shapes(vae, images):
    with torch.no_grad():
        z = torch.randn(2, 4, 4, 6)
        decoded = vae.decode(z)
        assert isinstance(decoded, DecoderOutput)
        assert decoded.sample.shape == (2, 3, 16, 24)
        (decoded_tuple,) = vae.decode(z, return_dict=False)
        torch.testing.assert_close(decoded_tuple, decoded.sample, atol=0, rtol=0)

        reconstruction = vae(images)
        assert isinstance(reconstruction, DecoderOutput)
        assert reconstruction.sample.shape == images.shape
        expected = vae.decode(vae.encode(images).latent_dist.mode()).sample
        torch.testing.assert_close(reconstruction.sample, expected, atol=0, rtol=0)

        sampled = vae(images, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        sampled_again = vae(images, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        torch.testing.assert_close(sampled, sampled_again, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 14, 16), (2, 3, 16, 18), (2, 1, 16, 16), (3, 16, 16)])
def test_encode_rejects_bad_images(vae, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (4, 4, 4)])
def test_decode_rejects_bad_latents(vae, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        vae.decode(torch.zeros(shape))


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(levels=0), "levels"),
        (dict(latent_channels=0), "latent_channels"),
        (dict(encoder_channels=(8,)), "encoder_channels"),
        (dict(encoder_channels=(8, 6)), "encoder_channels[1]"),
        (dict(decoder_block_out_channels=(8, 16)), "decoder_block_out_channels"),
        (dict(decoder_block_out_channels=(8, 16, 18)), "decoder_block_out_channels[2]"),
        (dict(aggregation_channels=10), "aggregation_channels"),
        (dict(scaling_factor=0.0), "scaling_factor"),
        (dict(scaling_factor=-1.0), "scaling_factor"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`")):
        LiteVAE(**{**TINY_VAE_CONFIG, **override})


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = LiteVAE(**TINY_VAE_CONFIG, scaling_factor=0.75, shift_factor=-0.125).eval()
    vae.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checksums.sha256",
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]

    loaded = LiteVAE.from_pretrained(tmp_path).eval()

    def saved_config(model):
        config = json.loads(model.to_json_string())
        config.pop("_name_or_path", None)
        return config

    assert saved_config(loaded) == saved_config(vae)
    assert loaded.config.scaling_factor == 0.75
    assert loaded.config.shift_factor == -0.125

    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.decode(z).sample - vae.decode(z).sample).abs().max() < 1e-6


# ---------------------------------------------------------------- default size


def test_default_encoder_is_light():
    vae = LiteVAE()
    encoder_params = sum(p.numel() for p in vae.encoder.parameters())
    # The SD-VAE encoder has about 34M parameters; LiteVAE's paper reports 6.75M.
    assert encoder_params < 7_000_000
    assert vae.spatial_compression == 16

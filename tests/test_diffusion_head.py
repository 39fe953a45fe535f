"""MAR's diffusion head: its sampler inverts its training objective, it fits the pipeline's head
slot, and its randomness is the caller's."""

import numpy as np
import pytest
import torch

from parscale_ear_hf import DiffusionHead, ParScaleEARPipeline

from conftest import ID2LABEL, tiny_components


def test_noise_from_uniform_is_standard_normal():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    x = DiffusionHead.noise_from_uniform(u)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert abs((x.abs() < 1).float().mean().item() - 0.6827) < 0.005
    assert torch.isfinite(DiffusionHead.noise_from_uniform(torch.tensor([0.0, 1.0 - 1e-9]))).all()


def test_shapes_config_checks_and_step_count():
    head = DiffusionHead(condition_dim=8, token_channels=3, width=16, depth=2, num_sampling_steps=7)
    assert head.noise_shape == (8, 3)
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    out = head.sample(torch.randn(5, 8), generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 3) and len(calls) == 7  # one forward per sampling step
    assert head.loss(torch.randn(5, 8), torch.randn(5, 3)).ndim == 0
    with pytest.raises(ValueError, match="num_sampling_steps"):
        DiffusionHead(num_train_timesteps=100, num_sampling_steps=101)


def test_temperature_scales_only_the_injected_noise():
    head = DiffusionHead(condition_dim=8, token_channels=3, width=16, depth=2, num_sampling_steps=6)
    z = torch.randn(4, 8)
    noise = torch.randn(4, *head.noise_shape)
    other = noise.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])  # same x_T, other step noise
    torch.testing.assert_close(head.sample(z, 0.0, noise=noise), head.sample(z, 0.0, noise=other))
    assert not torch.allclose(head.sample(z, 1.0, noise=noise), head.sample(z, 1.0, noise=other))


def test_trained_head_samples_the_conditional_distribution():
    """Two conditions, targets N(+-2, 0.3^2) per channel: after training, the samples of each
    condition have that mean and spread. Breaks if training and sampling schedules disagree."""
    torch.manual_seed(0)
    head = DiffusionHead(condition_dim=2, token_channels=2, width=64, depth=2, num_sampling_steps=50)
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        cls = torch.randint(0, 2, (256,), generator=generator)
        z = torch.nn.functional.one_hot(cls, 2).float()
        target = (cls[:, None].float() * 4 - 2) + 0.3 * torch.randn(256, 2, generator=generator)
        loss = head.loss(z, target, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    z = torch.eye(2).repeat_interleave(500, dim=0)
    samples = head.sample(z, 1.0, generator=torch.Generator().manual_seed(1)).view(2, 500, 2)
    means, stds = samples.mean(dim=1), samples.std(dim=1)
    torch.testing.assert_close(means, torch.tensor([[-2.0, -2.0], [2.0, 2.0]]), atol=0.15, rtol=0)
    assert ((stds > 0.15) & (stds < 0.5)).all(), stds


def _diffusion_pipeline(seed=0):
    components = tiny_components(seed=seed)
    torch.manual_seed(seed)
    components["energy_head"] = DiffusionHead(
        condition_dim=32, token_channels=4, width=32, depth=2, num_sampling_steps=5
    )
    pipe = ParScaleEARPipeline(**components, id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_runs_with_the_diffusion_head(tmp_path):
    pipe = _diffusion_pipeline()
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batch = pipe([1, 2, 3], num_inference_steps=4, generator=gens, output_type="np").images
    alone = pipe([2], num_inference_steps=4, generator=[torch.Generator().manual_seed(1)], output_type="np").images
    assert batch.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = ParScaleEARPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.energy_head, DiffusionHead)
    again = loaded([2], num_inference_steps=4, generator=[torch.Generator().manual_seed(1)], output_type="np").images
    np.testing.assert_allclose(again, alone, atol=1e-6)


def test_pipeline_rejects_a_head_of_the_wrong_width():
    components = tiny_components()
    components["energy_head"] = DiffusionHead(condition_dim=16, token_channels=4, width=8, depth=1)
    with pytest.raises(ValueError, match="energy_head.config.condition_dim=16"):
        ParScaleEARPipeline(**components)

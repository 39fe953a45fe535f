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


def test_sampler_draws_a_gaussian_target_given_the_exact_noise_prediction():
    """Targets N(mu, 0.3^2) per channel have a closed-form E[eps | x_t]; a head that outputs it (variance at
    the posterior's, v = -1) must sample that distribution through MAR's respaced schedule from t = 999.
    Breaks if the sampler's tables, respacing or timestep map disagree with the training schedule."""
    head = DiffusionHead(condition_dim=2, token_channels=2, width=8, depth=1, num_sampling_steps=100)
    mu, s = torch.tensor([-2.0, 1.0]), 0.3

    def exact_eps(x_t, timesteps, z):
        a = head.train_schedule.at("sqrt_alpha_bar", torch.as_tensor(timesteps).expand(x_t.shape[0])) ** 2
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    head.forward = exact_eps
    samples = head.sample(torch.zeros(4000, 2), 1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples.mean(dim=0), mu, atol=0.03, rtol=0)
    assert ((samples.std(dim=0) > 0.25) & (samples.std(dim=0) < 0.35)).all(), samples.std(dim=0)


def test_guidance_mixes_eps_inside_the_head_and_keeps_the_conditional_variance():
    torch.manual_seed(0)
    head = DiffusionHead(condition_dim=8, token_channels=3, width=16, depth=2, num_sampling_steps=5)
    for p in head.parameters():
        p.data += 0.1 * torch.randn_like(p)
    z, z_uncond, x = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3)
    step = head.sample_schedule.timestep_map[2]
    cond, uncond = head(x, step, z), head(x, step, z_uncond)
    mixed = head.guided_output(x, 2, z, z_uncond, 2.5)
    torch.testing.assert_close(mixed[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(mixed[:, 3:], cond[:, 3:])
    noise = torch.randn(4, *head.noise_shape)
    plain = head.sample(z, 0.7, noise=noise)
    torch.testing.assert_close(head.sample(z, 0.7, noise=noise, z_uncond=z_uncond, guidance_scale=1.0), plain)
    assert not torch.allclose(head.sample(z, 0.7, noise=noise, z_uncond=z_uncond, guidance_scale=3.0), plain)


def test_loss_takes_given_timesteps_and_noise_and_its_bound_trains_only_the_variance():
    torch.manual_seed(0)
    head = DiffusionHead(condition_dim=8, token_channels=3, width=16, depth=2)
    for p in head.parameters():
        p.data += 0.1 * torch.randn_like(p)
    z, target = torch.randn(5, 8), torch.randn(5, 3)
    t, noise = torch.tensor([0, 1, 500, 998, 999, 3, 7, 0, 42, 999]), torch.randn(10, 3)
    loss = head.loss(z, target, num_samples=2, timesteps=t, noise=noise)
    assert torch.equal(loss, head.loss(z, target, num_samples=2, timesteps=t, noise=noise))
    x_t = head.train_schedule.q_sample(target.repeat(2, 1), t, noise)
    out = head(x_t, t, z.repeat(2, 1))
    eps, v = out.chunk(2, dim=-1)
    mse = ((noise - eps) ** 2).mean(dim=-1)
    vb = head.train_schedule.vlb_bits(torch.cat([eps.detach(), v], dim=-1), target.repeat(2, 1), x_t, t)
    torch.testing.assert_close(loss, (mse + vb).mean())
    assert (vb[t == 0] > 0).all() and torch.isfinite(vb).all()
    # The bound's gradient reaches only the variance half: d(loss)/d(eps) is the MSE's alone.
    out = out.detach().requires_grad_()
    eps, v = out.chunk(2, dim=-1)
    bound = head.train_schedule.vlb_bits(torch.cat([eps.detach(), v], dim=-1), target.repeat(2, 1), x_t, t)
    (grad,) = torch.autograd.grad(bound.sum(), out)
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0


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

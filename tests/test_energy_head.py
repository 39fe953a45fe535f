"""EnergyHead and the energy score: the loss is a proper score and the head learns a distribution."""

import pytest
import torch

from parscale_ear_hf import EnergyHead, energy_score_loss


def test_energy_score_k2_matches_formula():
    g = torch.Generator().manual_seed(0)
    x1, x2, y = (torch.randn(5, 3, generator=g) for _ in range(3))
    expected = ((x1 - y).norm(dim=-1) + (x2 - y).norm(dim=-1) - 0.99 * (x1 - x2).norm(dim=-1)).mean()
    assert torch.allclose(energy_score_loss(torch.stack([x1, x2]), y, lambda_=0.99), expected, atol=1e-6)


def test_energy_score_weight_is_a_weighted_mean():
    g = torch.Generator().manual_seed(1)
    samples, y = torch.randn(2, 6, 3, generator=g), torch.randn(6, 3, generator=g)
    weight = torch.tensor([1.0, 0, 1, 0, 0, 1])
    keep = weight.bool()
    assert torch.allclose(energy_score_loss(samples, y, weight=weight), energy_score_loss(samples[:, keep], y[keep]))


def test_energy_score_is_lower_for_the_target_distribution():
    # Proper scoring rule: in expectation the true distribution scores best, including against a
    # shifted one and an under-dispersed (collapsed) one.
    g = torch.Generator().manual_seed(0)
    m = 20000
    y = torch.randn(m, 2, generator=g)
    true = torch.randn(2, m, 2, generator=g)
    shifted = true + torch.tensor([0.5, 0.0])
    collapsed = 0.3 * true
    score = lambda s: energy_score_loss(s, y).item()  # noqa: E731
    assert score(true) < score(shifted) - 0.05
    assert score(true) < score(collapsed) - 0.05


@pytest.mark.parametrize(
    "samples_shape,target_shape", [((1, 4, 2), (4, 2)), ((3, 4, 2), (4, 2)), ((2, 4, 2), (4, 3)), ((4, 2), (4, 2))]
)
def test_energy_score_rejects_bad_shapes(samples_shape, target_shape):
    with pytest.raises(ValueError, match="energy_score_loss"):
        energy_score_loss(torch.zeros(samples_shape), torch.zeros(target_shape))


def test_head_learns_a_2d_conditional_distribution():
    torch.manual_seed(0)
    head = EnergyHead(condition_dim=2, token_channels=2, width=64, depth=2, noise_dim=8, mlp_ratio=2.0)
    means = torch.tensor([[1.5, -1.0], [-2.0, 0.5]])
    stds = torch.tensor([[0.5, 0.2], [0.1, 0.8]])
    conds = torch.eye(2)  # condition k selects distribution k
    # EAR's init starts the head at exactly 0, a collapsed distribution: this lr spreads it in 400 steps.
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        k = torch.randint(0, 2, (256,), generator=g)
        y = means[k] + stds[k] * torch.randn(256, 2, generator=g)
        loss = head.loss(conds[k], y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k in range(2):
        samples = head.sample(conds[k].expand(4000, 2), temperature=1.0, generator=g)
        assert torch.allclose(samples.mean(0), means[k], atol=0.12), (k, samples.mean(0))
        assert torch.allclose(samples.std(0), stds[k], rtol=0.25, atol=0.05), (k, samples.std(0))


def randomized_head(**config):
    """A head whose every parameter is random: a fresh one outputs exactly 0 (EAR's init)."""
    torch.manual_seed(0)
    head = EnergyHead(**{**dict(condition_dim=8, token_channels=3, width=16, depth=2, noise_dim=4), **config})
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head


def test_sample_is_one_forward_and_reproducible():
    head = randomized_head()
    z = torch.randn(5, 8)
    a = head.sample(z, generator=torch.Generator().manual_seed(3))
    b = head.sample(z, generator=torch.Generator().manual_seed(3))
    c = head.sample(z, generator=torch.Generator().manual_seed(4))
    assert a.shape == (5, 3) and torch.equal(a, b) and not torch.equal(a, c)
    noise = head.draw_noise(5, torch.Generator().manual_seed(3))
    assert noise.min() >= -0.5 and noise.max() <= 0.5
    assert torch.equal(head(z, noise), a)


def test_fresh_head_is_ears_init():
    """EAR's init: xavier Linear weights, zero modulations and output layer, so a fresh head outputs 0."""
    head = EnergyHead(condition_dim=8, token_channels=3, width=16, depth=2, noise_dim=4)
    assert torch.equal(head(torch.randn(5, 8), torch.rand(5, 4) - 0.5), torch.zeros(5, 3))
    zeroed = [block.modulation[1] for block in head.blocks] + [head.final_modulation[1], head.out]
    assert all(not layer.weight.any() and not layer.bias.any() for layer in zeroed)
    assert head.z_proj.weight.std() > 0.1 and not head.z_proj.bias.any()  # xavier: std sqrt(2 / (8 + 16)) = 0.29


def test_block_norm_affine_switch():
    affine = {k for k in EnergyHead(depth=2).state_dict() if ".norm." in k}
    assert affine == {f"blocks.{i}.norm.{p}" for i in range(2) for p in ("weight", "bias")}
    assert not [k for k in EnergyHead(depth=2, block_norm_affine=False).state_dict() if ".norm." in k]


@pytest.mark.parametrize("scales_final", [False, True])
def test_temperature_scales_only_the_shifts(scales_final):
    """T multiplies the blocks' AdaLN shifts (EAR) and, with the legacy switch, the final layer's too."""
    head = randomized_head(temperature_scales_final_layer=scales_final)
    z, noise = torch.randn(6, 8), torch.rand(6, 4) - 0.5
    with torch.no_grad():
        out_t = head(z, noise, temperature=0.5)
        layers = [(block.modulation[1], 3) for block in head.blocks]
        if scales_final:
            layers.append((head.final_modulation[1], 2))
        for layer, chunks in layers:  # halve the shift rows: what T=0.5 does
            layer.weight[: layer.out_features // chunks] *= 0.5
            layer.bias[: layer.out_features // chunks] *= 0.5
        assert torch.allclose(head(z, noise, temperature=1.0), out_t, atol=1e-5)


def test_loss_is_ears_estimator_with_copies():
    """score_batch_mul copies of each target, two head samples each, one mean over all copies."""
    head = randomized_head()
    z, y = torch.randn(5, 8), torch.randn(5, 3)
    noise = torch.rand(2 * 3 * 5, 4) - 0.5  # rows: (sample, copy, target)
    samples = head(z.repeat(6, 1), noise).view(2, 3, 5, 3)
    per_copy = [energy_score_loss(samples[:, c], y, lambda_=0.99) for c in range(3)]
    loss = head.loss(z, y, score_batch_mul=3, lambda_=0.99, noise=noise)
    assert torch.allclose(loss, torch.stack(per_copy).mean(), atol=1e-6)
    drawn = head.loss(z, y, score_batch_mul=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, head.loss(z, y, score_batch_mul=3, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "field,value",
    [
        ("width", 0),
        ("depth", -1),
        ("noise_dim", 1.5),
        ("mlp_ratio", 0),
        ("block_norm_affine", 1),
        ("temperature_scales_final_layer", "yes"),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EnergyHead(**{field: value})

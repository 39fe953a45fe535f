"""EARTransformer: what masked positions may see, ParScale streams, masking, label dropout."""

import pytest
import torch

from parscale_ear_hf import EARTrainingModel, EARTransformer
from parscale_ear_hf.models.ear_transformer import latents_to_tokens, tokens_to_latents

from conftest import tiny_components


def _tiny(**kwargs):
    args = dict(in_channels=4, grid_size=4, num_classes=10, hidden_size=32, num_layers=2, num_heads=4, buffer_size=4)
    args.update(kwargs)
    return EARTransformer(**args).eval()


def test_masked_token_values_never_reach_any_hidden_state():
    """The objective predicts masked tokens: their values must not influence any output."""
    torch.manual_seed(0)
    model = _tiny(parscale_n=2)
    tokens = torch.randn(3, 16, 4)
    labels = torch.tensor([1, 2, 10])
    mask = model.sample_mask(3, torch.Generator().manual_seed(0))
    changed = torch.where(mask.unsqueeze(-1), torch.randn_like(tokens) * 100, tokens)
    with torch.no_grad():
        assert torch.allclose(model(tokens, labels, mask), model(changed, labels, mask), atol=1e-6)
        # ... while a visible token does influence the hidden state of a masked position.
        visible = (~mask[0]).nonzero()[0, 0]
        poked = tokens.clone()
        poked[0, visible] += 1.0
        assert not torch.allclose(model(tokens, labels, mask)[0][mask[0]], model(poked, labels, mask)[0][mask[0]])


def test_training_loss_ignores_masked_inputs_through_lite_hybrid():
    """The full training forward (LiteHybrid -> backbone -> head) cannot see masked targets."""
    comps = tiny_components()
    model = EARTrainingModel(comps["lite_hybrid"], comps["transformer"].eval(), comps["energy_head"])
    latents, labels = torch.randn(2, 4, 4, 4), torch.tensor([3, 4])
    mask = model.transformer.sample_mask(2, torch.Generator().manual_seed(5))
    tokens = latents_to_tokens(latents)
    changed = torch.where(mask.unsqueeze(-1), tokens + 50.0, tokens)
    with torch.no_grad():
        h1 = model.transformer(model.lite_hybrid(tokens, mask), labels, mask)
        h2 = model.transformer(model.lite_hybrid(changed, mask), labels, mask)
    assert torch.allclose(h1, h2, atol=1e-5)


def test_parscale_p1_equals_plain_model_and_loads_plain_weights(tmp_path):
    plain = _tiny()
    p1 = _tiny(parscale_n=1)
    assert set(plain.state_dict()) == set(p1.state_dict())
    assert not any("stream" in k for k in p1.state_dict())
    plain.save_pretrained(tmp_path)
    loaded = EARTransformer.from_pretrained(tmp_path).eval()
    x, labels, mask = torch.randn(2, 16, 4), torch.tensor([0, 1]), torch.rand(2, 16) < 0.5
    with torch.no_grad():
        assert torch.equal(loaded(x, labels, mask), plain(x, labels, mask))


def test_parscale_weights_sum_to_one_and_are_smoothed():
    torch.manual_seed(0)
    p, eps = 4, 0.1
    model = _tiny(parscale_n=p, parscale_attn_smooth=eps)
    torch.nn.init.normal_(model.stream_aggregator[2].weight, std=5.0)  # make the softmax peaky
    streams = torch.randn(p, 2, 16, 32)
    w = model.stream_weights(streams)
    assert w.shape == (2, 16, p)
    assert torch.allclose(w.sum(-1), torch.ones(2, 16), atol=1e-6)
    assert w.min() >= eps / p - 1e-7 and w.max() <= 1 - eps + eps / p + 1e-7
    agg = model.aggregate_streams(streams)
    assert torch.allclose(agg, (w.permute(2, 0, 1).unsqueeze(-1) * streams).sum(0), atol=1e-5)


def test_parscale_streams_differ_only_by_their_prefix():
    torch.manual_seed(0)
    model = _tiny(parscale_n=2)
    x, labels, mask = torch.randn(1, 16, 4), torch.tensor([3]), torch.rand(1, 16) < 0.5
    with torch.no_grad():
        model.stream_prefix[1].copy_(model.stream_prefix[0])
        # Identical prefixes -> identical streams -> any convex combination is that stream.
        single = _tiny()
        single.load_state_dict({k: v for k, v in model.state_dict().items() if "stream" not in k})
        single.pos_embedding.data[:, :4] += model.stream_prefix[0]
        assert torch.allclose(model(x, labels, mask), single.eval()(x, labels, mask), atol=1e-5)


def test_sample_mask_ratio_and_reproducibility():
    model = _tiny(grid_size=8)
    ratios = []
    for seed in range(200):
        mask = model.sample_mask(4, torch.Generator().manual_seed(seed))
        counts = mask.sum(1)
        assert (counts == counts[0]).all()  # one ratio per batch
        ratios.append(counts[0].item() / 64)
    assert min(ratios) >= 0.7 - 1 / 64 and max(ratios) <= 1.0
    assert 0.8 < sum(ratios) / len(ratios) < 0.9  # N(1, 0.25) truncated to [0.7, 1] has mean ~0.85
    a = model.sample_mask(4, torch.Generator().manual_seed(1))
    assert torch.equal(a, model.sample_mask(4, torch.Generator().manual_seed(1)))
    assert not torch.equal(a[0], a[1])  # a random order per image


def test_drop_labels_rate_and_null_class():
    model = _tiny(class_dropout_prob=0.25)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    rate = (dropped == model.null_class).float().mean().item()
    assert model.null_class == 10 and abs(rate - 0.25) < 0.015
    assert set(dropped.unique().tolist()) == {0, 10}


def test_training_loss_backprops_to_all_components():
    comps = tiny_components()  # its head is not EAR's fresh one, whose zero output layer passes no gradient back
    model = EARTrainingModel(comps["lite_hybrid"], comps["transformer"], comps["energy_head"], score_batch_mul=2)
    loss = model(torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name in ("lite_hybrid.coarse_gate", "transformer.token_proj.weight", "energy_head.out.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_training_forward_is_mask_then_label_dropout_then_energy_loss():
    """forward draws the mask, then the label dropout, then the head noise, all from one generator;
    energy_loss is the rest (EAR's forward_loss), which the reference fixture checks."""
    comps = tiny_components()
    model = EARTrainingModel(
        comps["lite_hybrid"], comps["transformer"].eval(), comps["energy_head"], score_batch_mul=2
    )
    latents, labels = torch.randn(3, 4, 4, 4), torch.tensor([0, 5, 9])
    g = torch.Generator().manual_seed(7)
    mask = model.transformer.sample_mask(3, g)
    dropped = model.transformer.drop_labels(labels, g)
    expected = model.energy_loss(latents_to_tokens(latents), dropped, mask, generator=g)
    assert torch.equal(model(latents, labels, torch.Generator().manual_seed(7)), expected)


def test_training_model_rejects_a_bad_score_batch_mul():
    comps = tiny_components()
    with pytest.raises(ValueError, match="score_batch_mul"):
        EARTrainingModel(comps["lite_hybrid"], comps["transformer"], comps["energy_head"], score_batch_mul=0)


def test_training_rejects_out_of_range_labels():
    comps = tiny_components()
    model = EARTrainingModel(comps["lite_hybrid"], comps["transformer"], comps["energy_head"])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        model(torch.randn(2, 4, 4, 4), torch.tensor([0, 10]))


def test_tokens_latents_round_trip():
    latents = torch.randn(2, 4, 3, 3)
    tokens = latents_to_tokens(latents)
    assert tokens.shape == (2, 9, 4)
    assert torch.equal(tokens[:, 1], latents[:, :, 0, 1])  # raster order
    assert torch.equal(tokens_to_latents(tokens, 3), latents)


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 30),
        ("num_layers", 0),
        ("parscale_n", 0),
        ("parscale_attn_smooth", 1.5),
        ("class_dropout_prob", 1.0),
        ("mask_ratio_min", -0.1),
        ("grid_size", -1),
        ("mlp_activation", "relu"),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _tiny(**{field: value})

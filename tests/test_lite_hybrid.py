"""LiteHybrid: identity when off, reads only visible tokens, both branches act, stays cheap."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from parscale_ear_hf import EARTransformer, LiteHybrid


def _tiny(**kwargs):
    args = dict(in_channels=4, grid_size=4, coarse_grid_size=2, hidden_dim=8, num_heads=2)
    args.update(kwargs)
    module = LiteHybrid(**args)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("_gate"):
                param.normal_(std=0.5)
    return module


def test_identity_when_both_branches_off():
    off = LiteHybrid(
        in_channels=4, grid_size=4, coarse_grid_size=2, hidden_dim=8, num_heads=2, use_coarse=False, use_fine=False
    )
    x = torch.randn(2, 16, 4)
    assert torch.equal(off(x, torch.rand(2, 16) < 0.5), x)
    assert sum(p.numel() for p in off.parameters()) == 0


def test_identity_at_initialisation():
    # Zero gates: a freshly built module is plain EAR until training opens the gates.
    module = LiteHybrid(in_channels=4, grid_size=4, coarse_grid_size=2, hidden_dim=8, num_heads=2)
    x = torch.randn(2, 16, 4)
    assert torch.equal(module(x), x)


@pytest.mark.parametrize("use_coarse,use_fine", [(True, False), (False, True), (True, True)])
def test_each_branch_changes_visible_tokens_and_never_masked_ones(use_coarse, use_fine):
    torch.manual_seed(0)
    module = _tiny(use_coarse=use_coarse, use_fine=use_fine)
    x = torch.randn(2, 16, 4)
    mask = torch.rand(2, 16) < 0.5
    out = module(x, mask)
    assert out.shape == x.shape
    assert torch.equal(out[mask], x[mask])
    assert not torch.allclose(out[~mask], x[~mask])


def test_coarse_branch_mixes_globally_fine_branch_locally():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4)
    poked = x.clone()
    poked[0, 0] += 3.0  # top-left token
    far = 15  # bottom-right token: outside the fine branch's 3x3 neighbourhood
    fine = _tiny(use_coarse=False)
    coarse = _tiny(use_fine=False)
    assert torch.allclose(fine(x)[0, far], fine(poked)[0, far])
    assert not torch.allclose(coarse(x)[0, far], coarse(poked)[0, far])


@pytest.mark.parametrize("use_coarse,use_fine", [(True, False), (False, True)])
def test_masked_values_do_not_leak_into_visible_outputs(use_coarse, use_fine):
    torch.manual_seed(0)
    module = _tiny(use_coarse=use_coarse, use_fine=use_fine)
    x = torch.randn(3, 16, 4)
    mask = torch.rand(3, 16) < 0.6
    mask[:, 0] = True
    changed = torch.where(mask.unsqueeze(-1), x * 100 + 7, x)
    assert torch.allclose(module(x, mask)[~mask], module(changed, mask)[~mask], atol=1e-5)


def test_all_masked_rows_are_returned_unchanged():
    module = _tiny()
    x = torch.randn(2, 16, 4)
    out = module(x, torch.ones(2, 16, dtype=torch.bool))
    assert torch.equal(out, x) and torch.isfinite(out).all()


def test_cost_is_a_few_percent_of_a_backbone_forward():
    """FLOPs at the ImageNet-256 defaults, counted on the meta device (no compute)."""
    with torch.device("meta"):
        hybrid, backbone = LiteHybrid(), EARTransformer()
        tokens = torch.randn(8, 256, 32)
        mask = torch.zeros(8, 256, dtype=torch.bool)
        labels = torch.zeros(8, dtype=torch.long)
    with FlopCounterMode(display=False) as hybrid_flops:
        hybrid(tokens, mask)
    with FlopCounterMode(display=False) as backbone_flops:
        backbone(tokens, labels, mask)
    ratio = hybrid_flops.get_total_flops() / backbone_flops.get_total_flops()
    assert 0 < ratio < 0.03, ratio


def test_bad_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected tokens \(B, 16, 4\)"):
        _tiny()(torch.randn(2, 15, 4))


@pytest.mark.parametrize(
    "field,value", [("grid_size", 5), ("coarse_grid_size", 0), ("hidden_dim", 7), ("use_fine", "yes")]
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _tiny(**{field: value})


def test_plain_ear_pipeline_without_lite_hybrid_branches_samples_saves_and_loads(tmp_path):
    """Both branches off (the A1 baseline) leaves LiteHybrid without parameters: the pipeline must
    still find its device, sample, and round-trip through save / load."""
    from parscale_ear_hf import ParScaleEARPipeline

    from conftest import ID2LABEL, tiny_components

    pipe = ParScaleEARPipeline(**tiny_components(use_coarse=False, use_fine=False), id2label=ID2LABEL)
    pipe.set_progress_bar_config(disable=True)
    assert sum(p.numel() for p in pipe.lite_hybrid.parameters()) == 0
    images = pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.save_pretrained(tmp_path / "plain")
    loaded = ParScaleEARPipeline.from_pretrained(tmp_path / "plain")
    loaded.set_progress_bar_config(disable=True)
    again = loaded([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(images), atol=1e-6, rtol=0)

"""`parscale-ear plan`: the measurements against hand-computable cases, the arithmetic of the predictions, the
shipped ImageNet configs (the authors' sizes), and the command's JSON and Markdown."""

import argparse
import json
from pathlib import Path

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from parscale_ear_hf import plan
from parscale_ear_hf.cli import main
from parscale_ear_hf.models.lite_vae import LiteVAE

ROOT = Path(__file__).resolve().parents[1]
TINY_LATENTS = {"latent_channels": 4, "grid_size": 4, "num_classes": 10}


def tiny_config(parscale_n: int = 1, layers: int = 3, head_depth: int = 3) -> dict:
    return {
        "lite_hybrid": {"use_coarse": False, "use_fine": False},
        "transformer": {"hidden_size": 32, "num_layers": layers, "num_heads": 4, "buffer_size": 4,
                        "parscale_n": parscale_n},
        "energy_head": {"width": 24, "depth": head_depth, "noise_dim": 8},
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ measurements


def test_saved_bytes_of_a_hand_computable_step():
    """Linear(4, 8) -> ReLU -> Linear(8, 2) on (B, 4) fp32: autograd keeps the input (for the first weight's
    gradient) and the ReLU output (for the ReLU and the second weight's gradient: one storage, counted once);
    the weights are parameters, left out."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for batch in (1, 3):
        x = torch.randn(batch, 4)
        cost = plan.measure_step(lambda x=x: net(x).sum(), exclude=net.parameters())
        assert cost.saved_bytes == 4 * batch * (4 + 8)
    # Without the exclusion the second weight (8x2 floats, for the ReLU output's gradient) counts too; the first
    # is not kept, the input needs no gradient.
    assert plan.measure_step(lambda: net(x).sum()).saved_bytes == 4 * 3 * (4 + 8) + 4 * 8 * 2


def test_flops_of_a_linear_chain_are_six_per_parameter_per_token():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 4, bias=False))
    tokens = 5
    x = torch.randn(tokens, 8, requires_grad=True)  # so the first layer's input gradient is computed too
    cost = plan.measure_step(lambda: net(x).sum(), exclude=net.parameters())
    assert cost.flops == 6 * tokens * sum(p.numel() for p in net.parameters())


def test_cpu_attention_keeps_and_costs_what_cuda_flash_attention_does():
    """No (L, L) tensor is kept: q, k, v, the output (bf16) and a (B, heads, L) fp32 log-sum-exp; the FLOPs are
    the flash-attention formulas FlopCounterMode applies on a GPU."""
    b, h, n, d = 2, 3, 40, 8
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cost = plan.measure_step(lambda: F.scaled_dot_product_attention(q, k, v).float().sum())
    assert cost.saved_bytes == 4 * (b * h * n * d * 2) + b * h * n * 4
    shape = (b, h, n, d)
    expected = flop_counter.sdpa_flop_count(shape, shape, shape)
    expected += flop_counter.sdpa_backward_flop_count(shape, shape, shape, shape)
    assert cost.flops == expected > 0


def test_cuda_autocast_policy_on_the_cpu():
    for name in plan.CUDA_AUTOCAST_RULES:  # the premise: CUDA autocast has a rule for these, the CPU's none
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCPU"), name
    x = torch.randn(4, 8, dtype=torch.bfloat16)

    def dtypes():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.layer_norm(x, (8,)).dtype, x.norm(dim=-1).dtype, x.softmax(-1).dtype, x.pow(2).dtype

    assert dtypes() == (torch.bfloat16,) * 4
    with plan.cuda_autocast_policy():
        assert dtypes() == (torch.float32,) * 4
        with torch.autocast("cpu", dtype=torch.bfloat16):  # an output dtype the caller gives is kept, as on CUDA
            assert x.softmax(-1, dtype=torch.float64).dtype == torch.float64
            assert F.linear(x.float(), x.float()).dtype == torch.bfloat16  # lowered on both devices
    assert dtypes() == (torch.bfloat16,) * 4  # and gone after


def test_the_rules_are_the_ops_of_the_step_that_cuda_autocast_recasts():
    """CUDA_AUTOCAST_RULES lists exactly the ops with an AutocastCUDA rule and no AutocastCPU one that a training
    step (ParScale and checkpointing included) calls, so the CPU keeps the dtypes a GPU keeps."""
    names = [
        name
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::")
        and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")
        and not torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU")
    ]
    called = set()
    library = torch.library.Library("aten", "IMPL")
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def logger(name):
        packet, _, overload = name.removeprefix("aten::").partition(".")
        op = getattr(getattr(torch.ops.aten, packet), overload or "default")

        def kernel(*args, **kwargs):
            called.add(name.removeprefix("aten::"))
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                return op(*args, **kwargs)

        return kernel

    try:
        for name in names:
            library.impl(name.removeprefix("aten::"), logger(name), "AutocastCPU")
        for checkpointing in (False, True):
            _, step = plan.ear_training_step(
                tiny_config(parscale_n=2), batch=2, grad_checkpointing=checkpointing, latents=TINY_LATENTS
            )
            step().backward()
    finally:
        library._destroy()
    assert len(names) > 20
    assert called == set(plan.CUDA_AUTOCAST_RULES)


def test_depth_and_batch_extensions_are_exact():
    """The figures measured at 1-2 blocks and batch 1-2, extended to 3 + 3 blocks and batch 3, are those of the
    full step (ParScale P=2, with and without checkpointing)."""
    config = tiny_config(parscale_n=2)
    measured = plan.measure_config(config, TINY_LATENTS)
    for mode in plan.MODES:
        checkpointing = mode == "grad_checkpointing"
        act = measured["activation_bytes"][mode]
        full = plan.measure_ear_step(config, batch=3, grad_checkpointing=checkpointing, latents=TINY_LATENTS)
        assert full.saved_bytes == act["fixed"] + 3 * act["per_image"]
        masked = measured["masked_tokens"]["for_flops"]
        full = plan.measure_ear_step(config, batch=1, masked=masked, grad_checkpointing=checkpointing,
                                     latents=TINY_LATENTS)  # fmt: skip
        assert full.flops == measured["train_flops_per_image"]["with_recompute" if checkpointing else "model"]
    plain = measured["activation_bytes"]["no_checkpointing"]
    assert measured["activation_bytes"]["grad_checkpointing"]["per_image"] < plain["per_image"] / 2
    assert 0 < plain["backbone_block_per_image"] < plain["per_image"] and plain["head_block_per_image"] > 0
    assert measured["train_flops_per_image"]["with_recompute"] > measured["train_flops_per_image"]["model"]


def test_expected_mask_ratio_is_the_authors_truncated_normal():
    authors = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).mean()  # EAR's mask_ratio_generator
    assert plan.expected_mask_ratio(0.7, 0.25) == pytest.approx(authors, abs=1e-12)


# ------------------------------------------------------------------------------------------ predictions


def activations(per_image: float, fixed: float = 1e8) -> dict:
    return {
        "no_checkpointing": {"per_image": per_image, "fixed": fixed, "backbone_block_per_image": per_image / 40,
                             "head_block_per_image": per_image / 20},
        "grad_checkpointing": {"per_image": per_image / 10, "fixed": fixed / 10},
    }  # fmt: skip


def test_largest_batch_fits_and_one_more_does_not():
    budget, state = 60 * plan.GIB, 10 * plan.GIB
    for mode in plan.MODES:
        act = activations(3e8)
        batch = plan.largest_batch(budget, state, act, mode)
        assert batch > 0
        assert state + plan.activation_bytes_at(batch, act, mode) <= budget
        assert state + plan.activation_bytes_at(batch + 1, act, mode) > budget
        block = act["no_checkpointing"]["head_block_per_image"]  # the larger block
        kept = act[mode]["fixed"] + batch * (act[mode]["per_image"] + plan.BLOCKS_IN_FLIGHT[mode] * block)
        assert plan.activation_bytes_at(batch, act, mode) == kept
    assert plan.largest_batch(budget, 70 * plan.GIB, activations(3e8), "no_checkpointing") == 0


def test_largest_batch_is_monotone():
    act = activations(3e8)
    budgets = [b * plan.GIB for b in (12, 20, 40, 80, 140)]
    batches = [plan.largest_batch(b, 10 * plan.GIB, act, "no_checkpointing") for b in budgets]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    by_size = [plan.largest_batch(60 * plan.GIB, 10 * plan.GIB, activations(p), "no_checkpointing")
               for p in (1e8, 2e8, 4e8, 8e8)]  # fmt: skip
    assert by_size == sorted(by_size, reverse=True) and by_size[0] > by_size[-1]
    checkpointed = plan.largest_batch(60 * plan.GIB, 10 * plan.GIB, act, "grad_checkpointing")
    assert checkpointed > plan.largest_batch(60 * plan.GIB, 10 * plan.GIB, act, "no_checkpointing")


@pytest.mark.parametrize("gpus", [1, 8, 32])
def test_accumulation_reaches_the_global_batch(gpus):
    for max_batch in (1, 3, 64, 100, 255, 256, 5000):
        step = plan.accumulation(max_batch, gpus, 2048)
        assert step["per_gpu_batch"] * gpus * step["gradient_accumulation_steps"] == 2048
        assert step["per_gpu_batch"] <= max_batch and step["batch_size_flag"] == step["per_gpu_batch"] * gpus
        assert step["per_gpu_batch"] * 2 > min(max_batch, 2048 // gpus)  # the largest power of two that fits
    assert plan.accumulation(0, gpus, 2048) is None


def test_state_bytes():
    assert plan.state_bytes(10, 1) == {"weights": 40, "gradients": 40, "adamw_moments": 80, "ema": 40}
    assert plan.state_bytes(10, 8)["ddp_buckets"] == 40 and sum(plan.state_bytes(10, 8).values()) == 240


# ------------------------------------------------------------------------------------------ shipped configs

# The authors' parameter counts (EAR, Table 2) and sizes: backbone width x depth, heads, head width x depth.
AUTHORS = {
    "ear_b": (205e6, 768, 24, 12, 1024, 6),
    "ear_l": (474e6, 1024, 32, 16, 1280, 8),
    "ear_h": (937e6, 1280, 40, 16, 1536, 12),
}


def build(name: str):
    config = plan.load_plan_configs(plan.CONFIG_DIR, [name])[name]
    with torch.device("meta"):
        return plan.training_model(config)  # build_components, as train builds them


@pytest.mark.parametrize("name", list(AUTHORS))
def test_shipped_ear_configs_have_the_authors_sizes(name):
    """Counted: the backbone (EARTransformer) and the energy head, the parts EAR's parameter counts cover; the
    LiteHybrid is off (identity, no parameters) and the VAE is not part of the generator."""
    params, width, depth, heads, head_width, head_depth = AUTHORS[name]
    model = build(name)
    t, e = model.transformer.config, model.energy_head.config
    assert (t.hidden_size, t.num_layers, t.num_heads, t.parscale_n) == (width, depth, heads, 1)
    assert (e.width, e.depth, e.noise_dim, t.buffer_size) == (head_width, head_depth, 64, 64)
    assert not (model.lite_hybrid.config.use_coarse or model.lite_hybrid.config.use_fine)
    assert sum(p.numel() for p in model.lite_hybrid.parameters()) == 0
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


@pytest.mark.parametrize("streams", [2, 4])
def test_shipped_parscale_configs_are_ear_b_with_streams(streams):
    base, model = build("ear_b"), build(f"ear_b_p{streams}")
    assert model.transformer.config.parscale_n == streams
    assert {k: v for k, v in model.transformer.config.items() if k != "parscale_n"} == {
        k: v for k, v in base.transformer.config.items() if k != "parscale_n"
    }
    assert model.energy_head.config == base.energy_head.config
    # Stream prefixes (P x 64 x 768) and the aggregator Linear(P*768, 768) -> SiLU -> Linear(768, P).
    extra = streams * 64 * 768 + (streams * 768 * 768 + 768) + (768 * streams + streams)
    count = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    assert count == extra


def test_shipped_litevae_config_is_the_default():
    config = json.loads((plan.CONFIG_DIR / "litevae_in256.json").read_text())
    default = {k: v for k, v in LiteVAE().config.items() if not k.startswith("_")}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in default.items() if k in config} == config
    assert set(default) - set(config) == {"scaling_factor", "shift_factor"}  # measured by train-vae
    assert LiteVAE(**config).config.latent_channels == 32


def test_plan_reads_the_shipped_config_files():
    assert plan.CONFIG_DIR == ROOT / "examples" / "configs"
    parser = plan.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert Path(args.config_dir) == plan.CONFIG_DIR and args.models == list(plan.PLAN_MODELS)
    configs = plan.load_plan_configs(args.config_dir, args.models)
    for name, config in configs.items():
        assert config == json.loads((ROOT / "examples" / "configs" / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------------ the command


def test_plan_command_writes_the_json_and_the_page_from_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plan, "IMAGENET_LATENTS", TINY_LATENTS)  # a 4x4 token grid, for speed
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ear_b.json").write_text(json.dumps(tiny_config()))
    out, page = tmp_path / "plan.json", tmp_path / "docs" / "plan.md"
    main(["plan", "--config-dir", str(configs), "--models", "ear_b", "--gpus", "1", "8", "--output", str(out),
          "--markdown", str(page)])  # fmt: skip
    record = json.loads(out.read_text())
    assert set(record["provenance"]) >= {"command", "git_revision", "machine", "time_utc"}
    assert "predicted" in record["labels"]["predicted"] and "measured on CPU" in record["labels"]["measured_on_cpu"]
    model = record["models"]["ear_b"]
    assert set(model) == {"name", "config_file", "parameters", "measured_on_cpu", "predicted"}
    assert model["parameters"]["total"] == model["parameters"]["transformer"] + model["parameters"]["energy_head"]
    predicted = model["predicted"]
    one, eight = (predicted["global_batch_plan"]["no_checkpointing"][g] for g in ("1", "8"))
    assert one["per_gpu_batch"] * one["gradient_accumulation_steps"] == 2048
    assert eight["per_gpu_batch"] * 8 * eight["gradient_accumulation_steps"] == 2048
    assert predicted["gpu_hours"]["grad_checkpointing"] > predicted["gpu_hours"]["no_checkpointing"] > 0
    assert page.read_text() == plan.plan_markdown(record, str(out))
    text = page.read_text()
    assert "(predicted)" in text and "**measured on CPU**" in text and "| EAR-B |" in text
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mfu", "0"], "plan: `--mfu` must be a finite number in [1e-06, 1.0], got 0.0"),
        (["--gpus", "3"], "plan: --global-batch 2048 is not a multiple of --gpus 3"),
        (["--fragmentation", "1"], "plan: `--fragmentation` must be a finite number in [0.0, 1.0), got 1.0"),
        (["--config-dir", "nowhere"], "plan: --config-dir 'nowhere' has no ear_b.json"),
    ],
)
def test_plan_refuses_bad_flags_by_name(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--models", "ear_b", *flags])
    assert message in capsys.readouterr().err

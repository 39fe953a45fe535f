"""The sampling FLOPs count (examples/research/benchmarks/sampling_flops.py): counted on the meta device while the
pipeline samples, equal to a hand count of the matmul shapes, lower with the caches, equal to the per-step-shape
shortcut; the H100 arithmetic on it; the docs table is the results file's."""

import argparse
from pathlib import Path

import pytest

from parscale_ear_hf.info import count_parameters
from parscale_ear_hf.pipeline_parscale_ear import SamplingCache, mask_schedule
from research.benchmarks import sampling_flops as sf

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=32, layers=2, heads=2, buffer=4, mlp_ratio=4.0, width=32, depth=2, noise=8, grid=4, channels=4)


def tiny_pipe(parscale_n: int = 1):
    t = TINY
    config = {
        "lite_hybrid": {"use_coarse": False, "use_fine": False},
        "transformer": {"hidden_size": t["hidden"], "num_layers": t["layers"], "num_heads": t["heads"],
                        "buffer_size": t["buffer"], "mlp_ratio": t["mlp_ratio"], "parscale_n": parscale_n},
        "energy_head": {"width": t["width"], "depth": t["depth"], "noise_dim": t["noise"], "mlp_ratio": 1.0},
    }  # fmt: skip
    data = {"in_channels": t["channels"], "grid_size": t["grid"], "num_classes": 10}
    return sf.build_pipeline(config, sf.TINY["vae"], data)


def hand_count_step(batch: int, parscale_n: int, predicted: int) -> int:
    """FLOPs of one guided exact step from the matmul shapes (2 per multiply-accumulate): the backbone over both
    guidance passes as one batch, P streams as batch rows, its last block's queries, attention output and MLP
    only at the `predicted` tokens per image (keys and values at every position), then the head on them."""
    t = TINY
    d, n, c, w = t["hidden"], t["grid"] ** 2, t["channels"], t["width"]
    rows_in, length = 2 * batch, t["buffer"] + n
    rows = rows_in * parscale_n
    hidden = int(d * t["mlp_ratio"])
    block = 2 * rows * length * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * rows * length * length * d
    last = 2 * rows * length * 2 * d * d + 2 * rows * predicted * (d * d + d * d + 2 * d * hidden + 2 * length * d)
    backbone = 2 * rows_in * n * c * d + (t["layers"] - 1) * block + last
    if parscale_n > 1:  # the streams' aggregation: Linear(P D, D), SiLU, Linear(D, P) at the predicted positions
        backbone += 2 * rows_in * predicted * (parscale_n * d * d + d * parscale_n)
    per_token = d * w + t["noise"] * w + t["depth"] * (w * 3 * w + 2 * w * w) + w * 2 * w + w * c
    return backbone + 2 * batch * predicted * per_token


@pytest.mark.parametrize("parscale_n", [1, 2])
def test_counted_steps_equal_the_hand_count_of_the_matmul_shapes(parscale_n):
    batch, steps, n = 2, 4, TINY["grid"] ** 2
    counted = sf.count_sampling(tiny_pipe(parscale_n), steps, None, batch)
    masked = n
    for step, flops in enumerate(counted["step_flops"]):
        masked_next = mask_schedule(step, steps, n, masked)
        assert flops * batch == hand_count_step(batch, parscale_n, masked - masked_next), step
        masked = masked_next
    assert counted["decode_flops"] > 0 and "aten.convolution" in counted["flops_by_op"]


def test_an_exact_step_reads_every_weight_of_the_backbone_and_head_once():
    pipe = tiny_pipe(2)
    counted = sf.count_sampling(pipe, 4, None, batch=3)
    weights = sf.BF16_BYTES * (count_parameters(pipe.transformer) + count_parameters(pipe.energy_head))
    assert counted["step_weight_bytes"] == [weights] * 4
    assert counted["decode_weight_bytes"] == sf.BF16_BYTES * count_parameters(pipe.vae.decoder) + sf.BF16_BYTES * (
        count_parameters(pipe.vae.post_quant_conv)
    )
    assert all(n > 0 for n in counted["step_launches"])


def test_the_default_caches_count_fewer_flops_than_exact_sampling():
    pipe = tiny_pipe()
    exact = sf.count_sampling(pipe, 16, None)
    cached = sf.count_sampling(pipe, 16, sf.default_cache(16))
    # SamplingCache()'s settings, the refresh resolved by the step count.
    assert sf.default_cache(16) == SamplingCache(refresh_every=8) and sf.default_cache(8).refresh_every == 4
    assert sum(cached["step_flops"]) < sum(exact["step_flops"])
    assert cached["decode_flops"] == exact["decode_flops"]
    refresh = sf.default_cache(16).refresh_every
    # A refresh step runs every block over every position (exact sampling's last block runs at the predicted rows
    # only), both guidance passes as one batch; the steps between skip work.
    assert cached["step_flops"][0] > exact["step_flops"][0]
    assert all(cached["step_flops"][k] < exact["step_flops"][k] for k in range(1, 16) if k % refresh)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_per_step_shape_shortcut_equals_the_full_count(batch):
    pipe = tiny_pipe()
    full = sf.count_sampling(pipe, 16, None, batch)
    assert sf.exact_count_by_step_shape(pipe, 16, batch) == sum(full["step_flops"]) + full["decode_flops"]


def test_roofline_time_and_the_batch_that_reaches_a_target():
    peak, bandwidth = sf.H100["bf16_dense_tflops"] * 1e12, sf.H100["hbm_tb_per_s"] * 1e12
    # One step of 1 ms at peak compute whose weights take 10 ms to read at batch 1.
    row = {"step_flops": [peak * 1e-3], "step_weight_bytes": [bandwidth * 1e-2], "step_launches": [0],
           "decode_flops": 0, "decode_weight_bytes": 0, "decode_launches": 0}  # fmt: skip
    assert sf.seconds_per_image(row, 1) == pytest.approx(1e-2)
    assert sf.seconds_per_image(row, 20) == pytest.approx(1e-3)
    assert sf.seconds_per_image(row, float("inf"), mfu=0.5) == pytest.approx(2e-3)
    assert sf.batch_for_target(row, 2e-3, mfu=1.0) == 5  # 10 ms / 5 = 2 ms; batch 4 gives 2.5 ms
    assert sf.batch_for_target(row, 1e-3, mfu=1.0) == 10
    assert sf.batch_for_target(row, 1.9e-3, mfu=0.5) is None  # compute alone is 2 ms
    row["step_launches"] = [1000]  # 5 ms of launches per call, shared by the batch
    assert sf.batch_for_target(row, 2e-3, mfu=1.0, launch_s=5e-6) == 8  # (10 + 5) ms / 8 < 2 ms, / 7 > 2 ms


def test_measure_runs_the_tiny_rows_on_the_cpu():
    args = argparse.Namespace(
        device="cpu", tiny=True, models=["ear_b"], parscale=[2], steps=[2], batches=[1, 2], repeats=1,
        budget_s=60.0, config_dir=sf.CONFIG_DIR, vae_config=sf.CONFIG_DIR / "kl16_vae.json",
    )  # fmt: skip
    record = sf.measure(args)
    assert [(r["sampling"], r["batch"]) for r in record["rows"]] == [
        ("exact", 1), ("exact", 2), ("cached", 1), ("cached", 2)
    ]  # fmt: skip
    assert record["sizes"].startswith("tiny") and all(r["seconds_per_image"] > 0 for r in record["rows"])
    assert record["device_name"] == "cpu" and record["not_measured"] == []


def test_measure_keeps_to_its_budget_and_a_rerun_continues_where_it_stopped():
    args = argparse.Namespace(
        device="cpu", tiny=True, models=["ear_b"], parscale=[1], steps=[2, 3], batches=[1], repeats=1,
        budget_s=60.0, config_dir=sf.CONFIG_DIR, vae_config=sf.CONFIG_DIR / "kl16_vae.json", total_budget_s=0.0,
    )  # fmt: skip
    saved = []
    # No time at all: nothing is measured, and the record names every row left.
    record = sf.measure(args, save=saved.append)
    assert record["rows"] == [] and saved == [] and len(record["not_measured"]) == 4
    assert (
        record["not_measured"][0]
        == "EAR-B P=1 2 steps exact: the run's --total-budget-s 0 was spent; run again to continue"
    )
    # An earlier run on this device measured one row: kept, the other three measured, the file saved after each.
    args.total_budget_s = None
    earlier = {**record, "rows": [{"model": "EAR-B", "parscale_n": 1, "num_inference_steps": 2, "sampling": "exact",
                                   "batch": 1, "seconds_per_image": 123.0, "git_revision": "abc"}]}  # fmt: skip
    record = sf.measure(args, previous=earlier, save=lambda r: saved.append(len(r["rows"])))
    assert record["rows"][0]["seconds_per_image"] == 123.0 and saved == [2, 3, 4]
    assert [sf.row_key(r)[2:] for r in record["rows"]] == [(2, "exact"), (2, "cached"), (3, "exact"), (3, "cached")]
    assert record["not_measured"] == [] and all(r["git_revision"] for r in record["rows"])
    # Another device's (or size's) rows are not kept.
    record = sf.measure(args, previous={**earlier, "device_name": "NVIDIA H100 80GB HBM3"})
    assert all(r["seconds_per_image"] != 123.0 for r in record["rows"]) and len(record["rows"]) == 4


def test_the_docs_table_is_the_results_files_and_says_it_is_computed():
    section = sf.readme_section(ROOT / "results")
    assert section.startswith("_Computed, not measured")
    assert (
        f"<!-- sampling-flops:start -->\n{section}\n<!-- sampling-flops:end -->"
        in (ROOT / "docs" / "benchmarks.md").read_text()
    )
    record = sf.load_results(ROOT / "results" / "sampling_flops.json")
    assert record["shortcut_check"]["equal"]
    assert {(r["model"], r["parscale_n"], r["num_inference_steps"], r["sampling"]) for r in record["rows"]} == {
        (m, p, s, mode) for m in sf.MODELS.values() for p in (1, 2) for s in (64, 16) for mode in ("exact", "cached")
    }


def test_attention_on_real_cpu_tensors_is_counted_as_on_the_meta_device():
    # Real CPU tensors run attention as a kernel FlopCounterMode does not know by itself: without its formula
    # the CPU count would miss attention. q @ k^T and p @ v: 2 * (2 * b * h * s * s * d).
    from functools import partial

    import torch
    import torch.nn.functional as F

    b, h, s, d = 2, 4, 24, 8
    expected = 4 * b * h * s * s * d
    for device in ("cpu", "meta"):
        q = torch.randn(b, h, s, d, device=device)
        assert sf.count_flops(partial(F.scaled_dot_product_attention, q, q, q)) == expected

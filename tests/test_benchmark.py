"""The benchmark's machinery on tiny configs: timing, FLOP counting, targets, tables and plot.
(Speed itself is never asserted here: these machines are shared and noisy.)"""

import json

import pytest
import torch

from research.benchmarks import benchmark as bm

from conftest import run_example, tiny_pipeline

TINY = dict(in_channels=4, grid_size=4, num_classes=10, hidden_size=32, num_layers=2, num_heads=4, buffer_size=4)


def test_measure_repeats_within_budget_and_reports_spread():
    bench = bm.Bench("cpu", torch.float32, repeats=50, budget_s=0.05, progress=False)
    calls = []

    def slow():
        calls.append(1)
        torch.ones(1).add_(1)
        import time

        time.sleep(0.01)

    row = bench.measure(slow, warmup=1)
    assert 2 <= row["repeats"] < 50 and len(calls) == row["repeats"] + 1
    assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["min_s"] >= 0.01
    assert row["peak_memory_mib"] is None  # not measured on a CPU, never made up


def test_transformer_flops_match_the_matmul_count():
    """Linear layers dominate: 2 * params_in_blocks * tokens, plus attention 4 * T^2 * d per layer."""
    flops = bm.transformer_flops(TINY, batch=3)
    d, layers, tokens = 32, 2, 4 + 16
    per_layer_linear = 2 * tokens * (3 * d * d + d * d + 2 * 4 * d * d)
    attention = 2 * 2 * tokens * tokens * d
    token_proj = 2 * 16 * 4 * d
    expected = 3 * (layers * (per_layer_linear + attention) + token_proj)
    assert flops == pytest.approx(expected, rel=0.02)
    assert bm.transformer_flops(dict(TINY, parscale_n=4), batch=3) > 3.9 * flops


def test_parscale_and_batch_sections_record_their_conditions():
    bench = bm.Bench("cpu", torch.float32, repeats=2, budget_s=1.0, progress=False)
    bm.bench_parscale(bench, TINY, batches=(2,), streams=(1, 4))
    rows = bench.results
    assert set(rows) == {"parscale/parscale_p1_b2", "parscale/parscale_p4_b2", "parscale/deeper_p4_b2",
                         "parscale/wider_p4_b2"}  # fmt: skip
    assert rows["parscale/deeper_p4_b2"]["config"]["num_layers"] == 8
    assert rows["parscale/wider_p4_b2"]["config"]["hidden_size"] == 64
    assert rows["parscale/parscale_p4_b2"]["flops"] > 3.9 * rows["parscale/parscale_p1_b2"]["flops"]
    bm.bench_batch_scaling(bench, tiny_pipeline(), (1, 2), steps=2, config="tiny")
    assert bench.results["batch/b2"]["seconds_per_image"] == pytest.approx(bench.results["batch/b2"]["median_s"] / 2)


def test_targets_markdown_and_plot(tmp_path):
    measurements = {
        "heads/speedup_32": {"ratio": 80.0, "tokens": 32},
        "heads/speedup_256": {"ratio": 40.0, "tokens": 256},
        "vae/encoder_comparison": {"speedup": 5.0, "param_ratio": 5.4},
        "hybrid/share_b8": {"ratio": 0.05, "batch": 8},
        "flops/transformer_b32": {"flop_per_s": 6e10},
        "flops/matmul_peak": {"flop_per_s": 1e11},
        "batch/b1": {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "repeats": 2, "warmup": 1,
                     "peak_memory_mib": None, "seconds_per_image": 1.0, "batch": 1, "steps": 2, "config": "tiny"},
        "batch/b4": {"median_s": 2.0, "min_s": 2.0, "max_s": 2.0, "repeats": 2, "warmup": 1,
                     "peak_memory_mib": None, "seconds_per_image": 0.5, "batch": 4, "steps": 2, "config": "tiny"},
    }  # fmt: skip
    targets = bm.check_targets(measurements)
    assert targets["energy_vs_diffusion_speedup"]["value"] == 40.0  # the worst token group counts
    assert targets["energy_vs_diffusion_speedup"]["met"] is False
    assert targets["litevae_encoder_speedup"]["met"] and targets["litevae_encoder_param_ratio"]["met"]
    assert targets["lite_hybrid_share_batch8"]["met"] is False
    assert targets["transformer_peak_fraction_batch32"]["value"] == pytest.approx(0.6)
    record = {"profile": "cpu", "device": "cpu", "device_name": None, "dtype": "torch.float32",
              "measurements": measurements, "targets": targets}  # fmt: skip
    text = bm.benchmark_markdown(record)
    assert "| energy head faster than the 100-step diffusion head, per token group | 40 | >= 50 | **no** |" in text
    assert "`batch/b4`" in text and "2e+03 ms" in text
    bm.plot_scaling(record, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 5000


def test_cli_runs_a_section_and_merges_results(tmp_path, monkeypatch):
    """`python examples/benchmark.py --sections matmul` writes the JSON, Markdown and plot; a second section
    is merged in without losing the first."""
    output = tmp_path / "bench.json"
    run_example("benchmark.py", "--device", "cpu", "--sections", "matmul", "--repeats", "2", "--output", str(output))
    record = json.loads(output.read_text())
    assert record["measurements"]["flops/matmul_peak"]["flop_per_s"] > 1e8
    assert output.with_suffix(".md").is_file() and output.with_suffix(".png").is_file()
    monkeypatch.setattr(bm, "bench_heads", lambda b, counts: b.results.update({"heads/speedup_1": {"ratio": 2.0}}))
    run_example("benchmark.py", "--device", "cpu", "--sections", "heads", "--output", str(output))
    record = json.loads(output.read_text())
    assert {"flops/matmul_peak", "heads/speedup_1"} <= set(record["measurements"])
    assert set(record["section_provenance"]) == {"matmul", "heads"}
    # A section run again replaces its own rows, and only its own.
    monkeypatch.setattr(bm, "bench_heads", lambda b, counts: b.results.update({"heads/speedup_2": {"ratio": 3.0}}))
    run_example("benchmark.py", "--device", "cpu", "--sections", "heads", "--output", str(output))
    measured = set(json.loads(output.read_text())["measurements"])
    assert "heads/speedup_2" in measured and "heads/speedup_1" not in measured and "flops/matmul_peak" in measured
    # Each section lists the rows it wrote, whatever their names: matmul's is `flops/...`.
    listed = json.loads(output.read_text())["section_provenance"]["matmul"]["rows"]
    assert listed == ["flops/matmul_peak"]
    with pytest.raises(SystemExit):
        run_example("benchmark.py", "--sections", "nope")


def test_merge_takes_named_sections_with_their_provenance_and_nothing_else(tmp_path):
    from parscale_ear_hf.results import write_results

    def results(path, rows: dict, revisions: dict, profile="cpu"):
        provenance = {section: {"git_revision": revision} for section, revision in revisions.items()}
        return write_results(
            path,
            {
                "metric": "benchmark",
                "profile": profile,
                "device": "cpu",
                "device_name": None,
                "dtype": "torch.float32",
                "measurements": rows,
                "section_provenance": provenance,
            },
        )

    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    results(ours, {"heads/speedup_1": {"ratio": 2.0}, "flops/matmul_peak": {"flop_per_s": 1e9}},
            {"heads": "a" * 40, "matmul": "a" * 40})  # fmt: skip
    results(theirs, {"heads/speedup_2": {"ratio": 3.0}, "flops/matmul_peak": {"flop_per_s": 5e9}},
            {"heads": "b" * 40, "matmul": "b" * 40})  # fmt: skip
    merged = bm.merge_sections(theirs, ours, ["heads"])
    # The heads rows and their provenance are the other run's; matmul stays ours.
    assert merged["measurements"] == {"heads/speedup_2": {"ratio": 3.0}, "flops/matmul_peak": {"flop_per_s": 1e9}}
    assert merged["section_provenance"]["heads"]["git_revision"] == "b" * 40
    assert merged["section_provenance"]["matmul"]["git_revision"] == "a" * 40
    assert json.loads(ours.read_text()) == merged and ours.with_suffix(".md").is_file()
    with pytest.raises(ValueError, match=r"has no section\(s\) \['vae'\]; it ran \['heads', 'matmul'\]"):
        bm.merge_sections(theirs, ours, ["vae"])
    # matmul's row is not named after it: without the rows its provenance lists, refused, not half merged.
    with pytest.raises(ValueError, match="lists no rows of section 'matmul'"):
        bm.merge_sections(theirs, ours, ["matmul"])
    theirs_record = json.loads(theirs.read_text())
    theirs_record["section_provenance"]["matmul"]["rows"] = ["flops/matmul_peak"]
    theirs.write_text(json.dumps(theirs_record))
    merged = bm.merge_sections(theirs, ours, ["matmul"])
    assert merged["measurements"]["flops/matmul_peak"] == {"flop_per_s": 5e9}
    assert merged["section_provenance"]["matmul"]["git_revision"] == "b" * 40
    results(theirs, {}, {"heads": "c" * 40}, profile="gpu")
    with pytest.raises(ValueError, match="is of the gpu profile"):
        bm.merge_sections(theirs, ours, ["heads"])
    with pytest.raises(ValueError, match="holds no results"):
        bm.merge_sections(tmp_path / "absent.json", ours, ["heads"])
    with pytest.raises(ValueError, match="name the sections"):
        bm.merge_sections(theirs, ours, None)


def test_cpu_memory_probe_sees_activations_grow_with_batch():
    """The fresh-process probe counts what one forward holds: 64 sequences of 272 x 256 floats
    (an MLP hidden of 4x that is 70 MiB alone) must show, one sequence must not."""
    config = dict(TINY, hidden_size=256, num_heads=4, grid_size=16, buffer_size=16)
    small = bm.cpu_peak_memory({"kind": "transformer", "config": config, "batch": 1})
    large = bm.cpu_peak_memory({"kind": "transformer", "config": config, "batch": 64})
    assert 0 < small < large and large - small > 50, (small, large)


def test_a_section_names_the_revision_it_started_at(tmp_path, monkeypatch):
    # A commit made while the sections run changes the checkout, not the code that runs: the revision read at
    # the start is the one recorded.
    import parscale_ear_hf.results as results

    revisions = iter(["a" * 40] + ["b" * 40] * 10)
    monkeypatch.setattr(results, "git_revision", lambda: next(revisions))
    monkeypatch.setattr(bm, "bench_heads", lambda b, counts: b.results.update({"heads/speedup_1": {"ratio": 2.0}}))
    output = tmp_path / "bench.json"
    run_example("benchmark.py", "--device", "cpu", "--sections", "heads", "--output", str(output))
    assert json.loads(output.read_text())["section_provenance"]["heads"]["git_revision"] == "a" * 40

"""The sampling benchmark's machinery on tiny configs: alternating timing, targets, report, resumable
quality points, the skip without the authors' code, and (with their checkout and timm) that their
sampler and ours give the same tokens. Speed itself is never asserted: these machines are shared."""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from parscale_ear_hf.results import write_results
from research.benchmarks import bench_sampling as bs
from research.benchmarks.benchmark import Bench
from research.reference import reference_ear, reference_mar

from conftest import run_example, tiny_pipeline

# The authors' EAR (shaochenze/EAR at 9256a9f): $EAR_REFERENCE_CODE, else a checkout beside this repository.
REFERENCE_CODE = Path(os.environ.get("EAR_REFERENCE_CODE", Path(__file__).resolve().parents[2] / "ear_ref" / "src"))
# The authors' MAR (LTH14/mar at fe470ac): $MAR_REFERENCE_CODE, else none (e.g. `git archive` of it into /tmp/mar_ref).
MAR_REFERENCE_CODE = os.environ.get("MAR_REFERENCE_CODE")
TINY_MAR = dict(grid_size=4, in_channels=4, num_classes=10, hidden_size=32, num_layers=2, num_heads=2, buffer_size=4,
                head_width=32, head_depth=2, num_sampling_steps=25)  # fmt: skip
TINY_EAR = dict(grid_size=4, in_channels=4, num_classes=10, hidden_size=32, num_layers=2, num_heads=4, buffer_size=4,
                head_width=32, head_depth=2, noise_dim=16)  # fmt: skip


def timing(median: float) -> dict:
    return {"median_s": median, "min_s": median, "max_s": median, "repeats": 3, "warmup": 1, "peak_memory_mib": None}


def synthetic_measurements(reference_skipped: bool = False) -> dict:
    m = {}
    for config, cached in (("demo", (3.0, 2.6)), ("mid", (4.0, 2.4))):
        for (batch, steps), value in zip(((1, 16), (16, 64)), cached):
            m[f"cache/{config}_b{batch}_s{steps}_exact"] = {**timing(1.0), "config": config, "batch": batch}
            m[f"cache/speedup_{config}_b{batch}_s{steps}"] = {
                "config": config, "batch": batch, "steps": steps, "cached": value, "cached_min": value - 0.1,
                "cached_max": value + 0.1, "compiled": 0.5 if batch == 1 else 1.3, "compiled_min": 0.4,
                "compiled_max": 1.4,
            }  # fmt: skip
    m["cache/speedup_demo_b1_s16"].update(flops_exact=8e9, flops_cached=2e9)
    m["cache/speedup_demo_b16_s64"].update(cached_compiled=3.9, cached_compiled_min=3.8, cached_compiled_max=4.0)
    m["cache/parts_demo_b1_s16"] = {
        "config": "demo", "batch": 1, "steps": 16,
        "exact": {"total": 300.0, "lite_hybrid": 15.0, "backbone_full": 250.0, "backbone_cached": 0.0, "head": 10.0,
                  "rest": 25.0},
        "cached": {"total": 120.0, "lite_hybrid": 15.0, "backbone_full": 40.0, "backbone_cached": 40.0, "head": 10.0,
                   "rest": 15.0},
    }  # fmt: skip
    m["cache/compiled_status_mid"] = {"available": False, "why": "no C++ compiler"}
    if reference_skipped:
        m["reference/status"] = {"skipped": "no checkout of the authors' EAR was given"}
    else:
        m["reference/status"] = {"code": "/ear", "commit": "9256a9f", "files": "models/ear.py", "timm": "1.0.31"}
        for batch, speedup in ((1, 1.5), (16, 0.9)):  # batch 16 is not part of the target
            m[f"reference/demo_b{batch}_s16_ours"] = timing(1.0)
            m[f"reference/demo_b{batch}_s16_reference"] = timing(speedup)
            m[f"reference/ratio_demo_b{batch}_s16"] = {
                "config": "demo", "batch": batch, "steps": 16, "ours_over_reference_median": 1 / speedup,
                "ours_over_reference_min": 0.5, "ours_over_reference_max": 1.5, "speedup": speedup,
                "flops_ours": 1e9, "flops_reference": 1.2e9, **({"speedup_compiled": 1.7} if batch == 1 else {}),
            }  # fmt: skip
        m["reference/agreement_demo"] = {"max_abs_diff": 0.0, "batch": 2, "steps": 16, "guidance": 3.0}
    for variant, steps, seed, fid, demo_fid, seconds in (
        ("exact", 16, 0, 80.0, 1.00, 0.08), ("cached", 16, 0, 82.0, 1.10, 0.03),
        ("exact", 16, 1, 84.0, 1.20, 0.08), ("cached", 16, 1, 84.0, 1.26, 0.03),
        ("exact", 64, 0, 70.0, 0.90, 0.30), ("cached", 64, 0, 73.0, 0.92, 0.10),
        ("token_cache", 16, 0, 81.0, 1.02, 0.05), ("dit", 32, 0, 60.0, 0.5, 0.2),
    ):  # fmt: skip
        name = f"{variant}_s{steps}_seed{seed}"
        m[f"quality/{name}"] = {"variant": variant, "steps": steps, "seed": seed, "fid": fid, "sfid": 40.0,
                                "demo_fid": demo_fid, "seconds_per_image": seconds,
                                "results_file": f"q/{name}.json"}  # fmt: skip
    m["quality/floor"] = {"fid_real": 10.5, "sfid_real": 18.3, "demo_fid_real": 0.166, "real_split": "train"}
    m["quality/dit_status"] = {"model": "runs/demo_dit/pipeline", "steps": [32]}
    return m


def test_targets_from_synthetic_results():
    targets = bs.check_targets(synthetic_measurements())
    # Cached: the faster cached variant against the faster exact one, the worst (batch, steps) of each config.
    # demo: batch 1 3.0 / 1 (compiled exact is slower there), batch 16 max(2.6, 3.9) / 1.3 = 3.0 (compiled exact
    # is 1.3x eager); mid: batch 16 2.4 / 1.3.
    assert targets["cached_speedup_demo"]["value"] == pytest.approx(3.0) and targets["cached_speedup_demo"]["met"]
    assert targets["cached_speedup_mid"]["value"] == pytest.approx(2.4 / 1.3)
    assert targets["cached_speedup_mid"]["met"] is False
    # FID: the worst over step counts of the mean over seeds of the relative increase over exact from the same
    # seed (64: +3/70 = 4.3%; 16: +2.5% and 0%). demo-FID at 16: +10% and +5%.
    assert targets["cached_fid_increase"]["value"] == pytest.approx(3 / 70) and targets["cached_fid_increase"]["met"]
    assert targets["cached_demo_fid_increase"]["value"] == pytest.approx(0.075)
    assert targets["cached_demo_fid_increase"]["met"] is False
    # Compiled: batch 16 only (batch 1 is 0.5x), strictly faster; unavailable says why.
    assert targets["compiled_speedup_b16_demo"]["value"] == 1.3 and targets["compiled_speedup_b16_demo"]["met"]
    assert targets["compiled_speedup_b16_mid"]["met"] is None  # its rows' values do not count
    assert targets["compiled_speedup_b16_mid"]["note"] == "no C++ compiler"
    assert bs._target("x", 1.0, 1.0, strict=True)["met"] is False and bs._target("x", 1.0, 1.0)["met"] is True
    # Reference: batch 1 only (batch 16 is 0.9x); a config not measured is "not measured", not passed.
    # the faster of ours eager (1.5x) and compiled (1.7x)
    assert targets["reference_speedup_b1_demo"]["value"] == 1.7 and targets["reference_speedup_b1_demo"]["met"]
    assert targets["reference_speedup_b1_mid"]["value"] is None and targets["reference_speedup_b1_mid"]["met"] is None
    lines = bs.target_lines(targets)
    failed = "FAIL: cached sampling faster than exact at the same steps, the faster of eager and compiled on each side"
    assert f"{failed} (mid, worst of batch x steps): 1.85" in "\n".join(lines)
    assert sum(line.startswith("PASS") for line in lines) == 4 and sum(line.startswith("FAIL") for line in lines) == 2


def test_skipped_reference_is_said_in_targets_and_report():
    m = synthetic_measurements(reference_skipped=True)
    targets = bs.check_targets(m)
    for config in bs.CONFIGS:
        assert targets[f"reference_speedup_b1_{config}"]["met"] is None
        assert "reference skipped: no checkout" in targets[f"reference_speedup_b1_{config}"]["note"]
    assert "Authors' sampler: **skipped** (no checkout of the authors' EAR was given)." in bs.speed_tables(m)


def test_report_tables_plot_and_readme_section(tmp_path):
    record = {"profile": "cpu", "device": "cpu", "device_name": None, "dtype": "torch.float32",
              "measurements": synthetic_measurements(), "section_provenance": {}}  # fmt: skip
    path = tmp_path / "benchmark_cpu.json"
    written = write_results(path, record)
    section_prov = {s: written["provenance"] for s in ("reference", "cache", "quality")}
    write_results(path, {**record, "section_provenance": section_prov})
    markdown = bs.write_report(path)
    md, png = tmp_path / "benchmark_cpu_sampling.md", tmp_path / "benchmark_cpu_sampling.png"
    assert md.read_text() == markdown + "\n" and png.stat().st_size > 10000
    assert "| demo | 1 | 16 | 1e+03 ms | 1.5e+03 ms | 0.667 (0.500-1.500) | 1.50x | 1.70x | 1.20x |" in markdown
    # FLOPs: exact's over cached's where counted, "-" for a row measured before they were.
    assert "| demo | 1 | 16 | 1e+03 ms | 3.00x (2.90-3.10) | 0.50x (0.40-1.40) | - | 4.00x |" in markdown
    assert "| demo | 16 | 64 | 1e+03 ms | 2.60x (2.50-2.70) | 1.30x (0.40-1.40) | 3.90x (3.80-4.00) | - |" in markdown
    # Where batch 1's time goes, and the bound: 300 / (120 - 40).
    assert "| demo | 16 | exact | 300 | 15 | 250 | 0 | 10 | 25 |  |" in markdown
    assert "| demo | 16 | cached | 120 | 15 | 40 | 40 | 10 | 15 | 3.75x |" in markdown
    assert "| cached | 64 | 0 | 0.1 | 73 | 40 | 0.92 | +4.3% | +2.2% |" in markdown
    # Two seeds: the mean (min to max); changes pair each seed with exact's.
    assert (
        "| cached | 16 | 0, 1 | 0.03 | 83 (82 to 84) | 40 (40 to 40) | 1.18 (1.1 to 1.26) | +1.2% (+0.0% to +2.5%) | "
        "+7.5% (+5.0% to +10.0%) |"
    ) in markdown
    assert "| DiTPipeline | 32 | 0 | 0.2 | 60 | 40 | 0.5 | - | - |" in markdown
    assert "| real `train` images (floor) | - | - | - | 10.5 | 18.3 | 0.166 | - | - |" in markdown
    # The quality rows are ordered exact, cached, each cache alone, ..., DiT.
    order = [markdown.index(f"| {name} |") for name in ("exact", "cached", "token_cache", "DiTPipeline")]
    assert order == sorted(order)
    section = bs.readme_section(tmp_path)
    assert "Full report: [`results/benchmark_cpu_sampling.md`]" in section
    assert "![speed vs quality, cpu](results/benchmark_cpu_sampling.png)" in section
    assert "(mid, worst of batch x steps) | 1.85 | >= 2.5 | **no** |" in section
    # Nothing measured: no report file, and the README block says how to measure.
    empty = tmp_path / "empty"
    write_results(empty / "benchmark_cpu.json", {**record, "measurements": {"batch/b1": timing(1.0)}})
    assert bs.write_report(empty / "benchmark_cpu.json") is None and not (empty / "benchmark_cpu_sampling.md").exists()
    assert "_Not measured yet._" in bs.readme_section(empty) and "--reference-code DIR" in bs.readme_section(empty)


def test_finished_quality_point_is_skipped_and_other_settings_refused(tmp_path):
    path = tmp_path / "exact_s16.json"
    settings = {"variant": "exact", "steps": 16, "images_per_class": 100}
    calls = []

    def measure():
        calls.append(1)
        return {"metrics": {"digit": {"demo_fid": 1.0}}, "seconds_per_image": 0.1}

    record, skipped = bs.run_point(path, settings, measure)
    assert not skipped and calls == [1] and record["provenance"]["git_revision"]
    assert json.loads(path.read_text())["metrics"] == {"digit": {"demo_fid": 1.0}}
    again, skipped = bs.run_point(path, settings, measure)
    assert skipped and calls == [1] and again == record  # finished: not measured again
    with pytest.raises(ValueError, match=r"images_per_class: 100 there, 50 now"):
        bs.run_point(path, {**settings, "images_per_class": 50}, measure)
    path.write_text(json.dumps({"settings": settings}))  # no metrics: not finished
    assert bs.run_point(path, settings, measure)[1] is False and calls == [1, 1]
    row = bs.point_row(record, str(path))
    assert row["demo_fid"] == 1.0 and row["fid"] is None and row["variant"] == "exact"


def test_quality_section_scores_each_point_once_with_its_flags(tmp_path, monkeypatch):
    """The orchestration, with `parscale-ear eval` replaced: each point's flags, its JSON, the skip on a
    second run, DiT absent, then present with one step count that fails."""
    from research.benchmarks import benchmark as bm

    calls, seeds = [], []

    def fake_score(args, kinds, model, steps, guidance, extra, work, seed=0):
        calls.append((model, steps, guidance, extra))
        seeds.append(seed)
        if model.endswith("dit") and steps == 4:
            raise RuntimeError("eval failed")
        return {"metrics": {"digit": {"demo_fid": steps / 10}}, "seconds_per_image": steps / 100}

    monkeypatch.setattr(bs, "score_point", fake_score)
    monkeypatch.setattr(bs, "quality_floor", lambda args, kinds, out: {"demo_fid_real": 0.1, "real_split": "train"})
    flags = ["--quality-steps", "2", "--quality-single-steps", "3", "--quality-extractors", "digit",
             "--quality-dir", str(tmp_path / "q"), "--dit-model", str(tmp_path / "dit"),
             "--dit-steps", "4", "8", "--quality-seeds", "0", "1"]  # fmt: skip
    args = bm.add_arguments(argparse.ArgumentParser()).parse_args(flags)
    b = Bench("cpu", torch.float32, repeats=3, budget_s=1.0, progress=False)
    bs.bench_quality(b, args)
    # Exact and cached from each seed; each cache alone and compiled from the first.
    names = ["e2", "c2", "e2_seed1", "c2_seed1", "t3", "k3", "x3"]
    extra = {steps_variant: call[3] for call, steps_variant in zip(calls, names)}
    assert len(calls) == 7 and seeds == [0, 0, 1, 1, 0, 0, 0] and extra["c2_seed1"] == extra["c2"]
    assert extra["e2"] == ["--temperature", "0.7"]
    # The default refresh is left to the eval (by the step count).
    assert extra["c2"] == ["--temperature", "0.7", "--token-cache", "--token-share", "0.1", "--condition-cache"]
    assert "--condition-cache" not in extra["t3"] and "--token-cache" in extra["t3"]
    assert "--token-cache" not in extra["k3"] and "--condition-cache" in extra["k3"]
    assert extra["x3"] == ["--temperature", "0.7", "--compile"]
    assert b.results["quality/cached_s2_seed1"]["seed"] == 1 and b.results["quality/compiled_s3_seed0"]["steps"] == 3
    written = json.loads((tmp_path / "q" / "cached_s2_seed0.json").read_text())["settings"]
    assert written["cache"]["refresh_every"] is None and written["seed"] == 0
    assert "holds no saved pipeline" in b.results["quality/dit_status"]["absent"]
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "model_index.json").write_text("{}")
    calls.clear()
    bs.bench_quality(b, args)
    # Ours finished earlier: skipped. DiT: scored without our options; the failure is reported.
    assert calls == [(str(tmp_path / "dit"), 4, 1.5, []), (str(tmp_path / "dit"), 8, 1.5, [])]
    assert b.results["quality/dit_status"]["dit_s4"] == "eval failed" and b.results["quality/dit_s8"]["steps"] == 8
    # With --quality-singles empty: exact and cached only (finished earlier), DiT as before.
    b = Bench("cpu", torch.float32, repeats=3, budget_s=1.0, progress=False)
    bs.bench_quality(b, bm.add_arguments(argparse.ArgumentParser()).parse_args([*flags, "--quality-singles"]))
    ours = sorted(name for name, row in b.results.items() if row.get("variant") not in (None, "dit"))
    assert ours == [f"quality/{v}_s2_seed{k}" for v in ("cached", "exact") for k in (0, 1)]


def test_cache_flags_and_eval_flags():
    cache = bs.make_cache({"token_cache": True, "token_share": 0.5, "condition_cache": False, "refresh_every": 2})
    assert bs.cache_flags(cache) == ["--token-cache", "--token-share", "0.5", "--cache-refresh-every", "2"]
    assert bs.cache_flags(None) == []
    with pytest.raises(ValueError, match="no flag for the cache fields {'full_layers': 2}"):
        bs.cache_flags(bs.make_cache({"full_layers": 2}))
    from parscale_ear_hf.evaluation import driver

    args = argparse.Namespace(quality_dataset="data/mnist_demo", quality_split="heldout", reference_cache_dir="refs",
                              quality_images_per_class=100, quality_batch_size=50,
                              classifier="models/digit_classifier", inception_weights=None)  # fmt: skip
    flags = ["--model", "m", *bs.eval_flags(args, "digit", 16, 3.0, Path("w")), "--temperature", "0.7",
             *bs.cache_flags(cache)]  # fmt: skip
    parsed = driver.add_arguments(argparse.ArgumentParser()).parse_args(flags)  # the eval command takes them
    assert (parsed.steps, parsed.guidance, parsed.token_share, parsed.output_dir) == (16, 3.0, 0.5, "w/digit")
    assert parsed.classifier == "models/digit_classifier" and parsed.results_file == "w/digit.json"


class FakeClockBench(Bench):
    """Runs each function once per `_once`, and returns its fixed duration."""

    def __init__(self, durations, budget_s=100.0, repeats=5):
        super().__init__("cpu", torch.float32, repeats=repeats, budget_s=budget_s, progress=False)
        self.durations, self.calls = durations, []

    def _once(self, fn):
        name = fn()
        self.calls.append(name)
        return self.durations[name]


def test_interleaved_rounds_alternate_and_ratios_are_paired():
    b = FakeClockBench({"a": 2.0, "b": 1.0})
    rows, times = bs.measure_interleaved(b, {"a": lambda: "a", "b": lambda: "b"})
    assert b.calls == ["a", "b"] + ["a", "b", "b", "a"] * 2 + ["a", "b"]  # warm-up, then A B / B A rounds
    assert rows["a"]["median_s"] == 2.0 and rows["a"]["repeats"] == 5 and rows["a"]["first_s"] == 2.0
    assert bs.paired_ratio(times["a"], times["b"]) == {"median": 2.0, "min": 2.0, "max": 2.0}
    assert bs.paired_ratio([1.0, 4.0, 3.0], [1.0, 1.0, 1.0]) == {"median": 3.0, "min": 1.0, "max": 4.0}
    # A round of 3 s with a 2 s budget per function: fewer rounds, never under 3.
    slow = FakeClockBench({"a": 2.0, "b": 1.0}, budget_s=2.0)
    assert bs.measure_interleaved(slow, {"a": lambda: "a", "b": lambda: "b"})[0]["a"]["repeats"] == 3


def test_cache_section_on_a_tiny_pipeline(monkeypatch):
    from parscale_ear_hf import pipeline_parscale_ear

    if not hasattr(pipeline_parscale_ear, "SamplingCache"):
        pytest.skip("this pipeline has no SamplingCache yet")
    pipe = tiny_pipeline()
    # torch.compile takes minutes on a CPU: the plumbing is tested with an eager copy in its place.
    monkeypatch.setattr(bs, "_compiled_copy", lambda p: (copy.deepcopy(p), {"available": True}))
    b = Bench("cpu", torch.float32, repeats=3, budget_s=5.0, progress=False)
    cache = dict(token_cache=True, token_share=0.25, condition_cache=True, refresh_every=2)
    bs.bench_cache(b, {"tiny": (pipe, "tiny pipeline")}, batches=(1,), steps=(2,), cache_fields=cache)
    variants = ("exact", "cached", "compiled", "cached_compiled")
    assert {f"cache/tiny_b1_s2_{v}" for v in variants} <= set(b.results)
    assert b.results["cache/tiny_b1_s2_cached"]["cache"]["refresh_every"] == 2
    assert "cache" not in b.results["cache/tiny_b1_s2_exact"]
    assert b.results["cache/tiny_b1_s2_compiled"]["compile_first_call_s"] > 0
    speedup = b.results["cache/speedup_tiny_b1_s2"]
    for v in variants[1:]:
        assert speedup[f"{v}_min"] <= speedup[v] <= speedup[f"{v}_max"]
    # Step 0 is a full pass either way; at step 1 the cached pass recomputes fewer positions: fewer FLOPs.
    assert 0 < speedup["flops_cached"] < speedup["flops_exact"]
    # At batch 1, where the time goes: exact makes no cached pass, cached makes one; the parts add up.
    parts = b.results["cache/parts_tiny_b1_s2"]
    assert parts["exact"]["backbone_cached"] == 0 < parts["cached"]["backbone_cached"]
    for variant in ("exact", "cached"):
        row = parts[variant]
        assert row["backbone_full"] > 0 and row["head"] > 0 and row["lite_hybrid"] > 0 and row["rest"] >= 0
    # The timers are gone: the pipeline's own methods again.
    assert not {"forward", "forward_partial"} & set(vars(pipe.transformer)) and "sample" not in vars(pipe.energy_head)
    profile = bs.compile_profile(pipe, pipe, [0, 1], steps=2)
    assert profile["eager_self_cpu_ms"] > 0 and " ms x" in profile["compiled_top"]


def test_absent_checkout_or_timm_is_a_clear_error_and_a_skip(tmp_path, monkeypatch):
    with pytest.raises(reference_ear.ReferenceUnavailable, match="--reference-code DIR"):
        reference_ear.check_reference_code(None)
    with pytest.raises(reference_ear.ReferenceUnavailable, match=r"lacks models/ear\.py, models/scoreloss\.py"):
        reference_ear.import_reference(tmp_path)
    for name in reference_ear.REFERENCE_FILES:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("raise AssertionError('never imported without timm')\n")
    real_find_spec = reference_ear.importlib.util.find_spec
    monkeypatch.setattr(
        reference_ear.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "timm" else real_find_spec(name, *a),
    )
    with pytest.raises(reference_ear.ReferenceUnavailable, match=r"pip install --no-deps timm==1\.0\.31"):
        reference_ear.import_reference(tmp_path)
    b = Bench("cpu", torch.float32, repeats=3, budget_s=1.0, progress=False)
    bs.bench_reference(b, tmp_path, {"tiny": TINY_EAR}, batches=(1,), steps=(2,))
    assert set(b.results) == {"reference/status"}
    assert "timm is not installed" in b.results["reference/status"]["skipped"]


def test_bench_cli_records_the_skipped_reference_and_its_targets(tmp_path):
    output = tmp_path / "bench.json"
    none = str(tmp_path / "none")
    sections = ["--sections", "reference", "mar_reference"]
    run_example("benchmark.py", "--device", "cpu", *sections, "--reference-code", none, "--mar-reference-code", none,
                "--output", str(output))  # fmt: skip
    record = json.loads(output.read_text())
    assert "is not a checkout of the authors' EAR" in record["measurements"]["reference/status"]["skipped"]
    assert "is not a checkout of the authors' MAR" in record["measurements"]["mar_reference/status"]["skipped"]
    assert set(record["section_provenance"]) == {"reference", "mar_reference"}
    assert "Authors' MAR sampler: **skipped**" in (tmp_path / "bench_sampling.md").read_text()
    assert record["sampling_targets"]["reference_speedup_b1_demo"]["met"] is None
    assert "**skipped**" in (tmp_path / "bench_sampling.md").read_text()


needs_reference = pytest.mark.skipif(
    not (REFERENCE_CODE / "models" / "ear.py").is_file() or reference_ear.importlib.util.find_spec("timm") is None,
    reason=f"needs the authors' EAR checkout ($EAR_REFERENCE_CODE or {REFERENCE_CODE}) and timm "
    f"(`{reference_ear.TIMM_INSTALL}`); CI has neither",
)


@needs_reference
def test_reference_section_times_ours_eager_and_compiled_against_theirs():
    """The section at a tiny config: ours, ours compiled and theirs timed in the same rounds, FLOPs counted, the
    tokens of the same orders and noise compared."""
    b = Bench("cpu", torch.float32, repeats=3, budget_s=5.0, progress=False)
    bs.bench_reference(b, REFERENCE_CODE, {"tiny": TINY_EAR}, batches=(1,), steps=(3,))
    assert b.results["reference/compiled_status_tiny"]["available"] is True
    assert {f"reference/tiny_b1_s3_{v}" for v in ("ours", "reference", "ours_compiled")} <= set(b.results)
    ratio = b.results["reference/ratio_tiny_b1_s3"]
    assert ratio["speedup"] > 0 and ratio["speedup_compiled"] > 0
    assert 0 < ratio["flops_ours"] < ratio["flops_reference"]  # our last block only at the rows predicted
    assert b.results["reference/agreement_tiny"]["max_abs_diff"] <= 1e-5  # the bound of the test below


@needs_reference
@pytest.mark.parametrize(("guidance", "steps"), [(1.0, 8), (3.0, 3), (3.0, 20)])
def test_reference_and_converted_model_sample_the_same_tokens(guidance, steps):
    """Same weights (through the converter), orders and noise: the authors' sampler and ours agree
    to float32 rounding (bound: tests/test_ear_reference.py's), and the noise does matter."""
    reference = reference_ear.build_reference(REFERENCE_CODE, TINY_EAR)
    pipe = reference_ear.our_pipeline(reference, TINY_EAR)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 5, 7])
    orders = torch.argsort(torch.rand(3, 16, generator=g), dim=1)
    noise = torch.rand(3, 16, 16, generator=g) - 0.5
    theirs = reference_ear.reference_sample_tokens(reference, labels, orders, noise, steps, guidance, 0.7)
    ours = pipe.sample_tokens(labels, orders, noise, steps, guidance, temperature=0.7)
    assert (ours - theirs).abs().max() <= 1e-5
    other = reference_ear.reference_sample_tokens(reference, labels, orders, noise.flip(1), steps, guidance, 0.7)
    assert (other - theirs).abs().max() > 1e-2
    # The shims are gone afterwards: no `models` package, no torchvision stub, the real Tensor.cuda.
    assert "models" not in sys.modules and "torchvision" not in sys.modules
    assert torch.Tensor.cuda is torch._C.TensorBase.cuda
    assert reference_ear.reference_sample(reference, labels, steps, guidance, 0.7).shape == (3, 4, 4, 4)


def mar_measurements() -> dict:
    m = {"mar_reference/status": {"code": "/mar", "commit": "fe470ac", "files": "models/mar.py", "timm": "1.0.31",
                                  "config": TINY_MAR, "model": reference_mar.describe(TINY_MAR)}}  # fmt: skip
    m["mar_reference/b1_s16_ours"], m["mar_reference/b1_s16_reference"] = timing(2.0), timing(2.5)
    m["mar_reference/b1_s16_cached"] = timing(1.0)
    m["mar_reference/ratio_b1_s16"] = {
        "batch": 1, "steps": 16, "ours_over_reference_median": 0.8, "ours_over_reference_min": 0.7,
        "ours_over_reference_max": 0.9, "speedup": 1.25, "cached": 2.0, "cached_min": 1.9, "cached_max": 2.1,
    }  # fmt: skip
    m["mar_reference/agreement"] = {"max_abs_diff": 0.0, "max_abs_token": 1.5e5, "relative": 0.0, "batch": 2,
                                    "steps": 16, "guidance": 3.0, "temperature": 1.0}  # fmt: skip
    return m


def test_mar_table_names_the_random_weight_model_first(tmp_path):
    lines = bs.mar_table(mar_measurements())
    assert lines[0].startswith("MAR, a random-weight config (not a released checkpoint): 4x4x4 tokens, encoder and "
                               "decoder 2 + 2 blocks of width 32, buffer 4, 10 classes, head 2 blocks of width 32, 25 "
                               "diffusion steps.")  # fmt: skip
    assert "| 1 | 16 | 2e+03 ms | 2.5e+03 ms | 0.800 (0.700-0.900) | 1e+03 ms | 2.00x (1.90-2.10) |" in lines
    assert "largest |ours - authors'| token difference 0 (tokens up to 1.5e+05" in lines[-2]
    assert bs.mar_table({}) == []
    skipped = {"mar_reference/status": {"skipped": "no checkout of the authors' MAR was given"}}
    assert bs.mar_table(skipped)[0] == "Authors' MAR sampler: **skipped** (no checkout of the authors' MAR was given)."
    # The MAR rows alone make a report and a docs block, beside the other sections' rows.
    record = {"profile": "cpu", "device": "cpu", "device_name": None, "dtype": "torch.float32",
              "measurements": {**synthetic_measurements(), **mar_measurements()}}  # fmt: skip
    written = write_results(tmp_path / "benchmark_cpu.json", {**record, "section_provenance": {}})
    write_results(
        tmp_path / "benchmark_cpu.json", {**record, "section_provenance": {"mar_reference": written["provenance"]}}
    )
    assert "| 1 | 16 | 2e+03 ms |" in bs.write_report(tmp_path / "benchmark_cpu.json")
    section = bs.readme_section(tmp_path)
    assert "MAR, a random-weight config" in section and "mar_reference at" in section
    assert "--mar-reference-code DIR" in section


def test_mar_config_and_skip_without_the_authors_code(tmp_path):
    kwargs = reference_mar.mar_kwargs(reference_mar.MAR_CONFIG)
    assert (kwargs["img_size"], kwargs["vae_embed_dim"], kwargs["num_sampling_steps"]) == (128, 16, "25")
    assert kwargs["attn_dropout"] == kwargs["proj_dropout"] == 0.0
    with pytest.raises(reference_ear.ReferenceUnavailable, match="--mar-reference-code DIR or \\$MAR_REFERENCE_CODE"):
        reference_mar.check_reference_code(None)
    with pytest.raises(reference_ear.ReferenceUnavailable, match=r"lacks models/mar\.py, models/diffloss\.py"):
        reference_mar.import_reference(tmp_path)
    b = Bench("cpu", torch.float32, repeats=3, budget_s=1.0, progress=False)
    bs.bench_mar_reference(b, tmp_path, TINY_MAR, batches=(1,), steps=(2,))
    assert set(b.results) == {"mar_reference/status"}
    assert "is not a checkout of the authors' MAR" in b.results["mar_reference/status"]["skipped"]
    args = bs.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.mar_batches == [1] and args.mar_reference_code == os.environ.get("MAR_REFERENCE_CODE")


def test_mar_draws_map_to_the_tokens_our_sampler_predicts():
    """MAR's draws per AR step (x_T for the step's tokens in raster order, image-major; then each diffusion step's
    draw, the unconditional rows after the conditional ones) land on the token each samples in our layout."""
    from parscale_ear_hf.pipeline_parscale_ear import mask_schedule, predicting_steps

    b, n, c, steps, num_iter = 2, 16, 3, 4, 5
    orders = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(b)])
    draws, masked = [], n
    for step in predicting_steps(num_iter, n):
        masked_next = mask_schedule(step, num_iter, n, masked)
        positions = orders[:, masked_next:masked].sort(dim=1).values
        # Each draw's value names its token (b * n + position) and diffusion step; the uncond rows are -1.
        code = (torch.arange(b)[:, None] * n + positions).reshape(-1, 1).float().expand(-1, c)
        draws.append(code.clone())
        draws += [torch.cat([code + 1000 * (k + 1), -torch.ones_like(code)]) for k in range(steps)]
        masked = masked_next
    noise = reference_mar.noise_in_our_layout(draws, orders, num_iter, steps)
    expected = (torch.arange(b * n).view(b, n, 1, 1) + 1000 * torch.arange(steps + 1).view(1, 1, -1, 1)).float()
    assert torch.equal(noise, expected.expand(b, n, steps + 1, c))
    with pytest.raises(RuntimeError, match="our schedule accounts for"):
        reference_mar.noise_in_our_layout(draws + draws[:1], orders, num_iter, steps)
    with pytest.raises(RuntimeError, match="x_T rows, our schedule predicts"):
        reference_mar.noise_in_our_layout(draws[1:], orders, num_iter, steps)


needs_mar_reference = pytest.mark.skipif(
    MAR_REFERENCE_CODE is None
    or not (Path(MAR_REFERENCE_CODE) / "models" / "mar.py").is_file()
    or reference_ear.importlib.util.find_spec("timm") is None,
    reason="needs the authors' MAR ($MAR_REFERENCE_CODE: LTH14/mar at fe470ac) and timm; CI has neither",
)


@needs_mar_reference
def test_mar_reference_section_times_both_and_their_tokens_agree():
    """The section at a tiny config: ours, theirs and cached timed; the same orders and draws give the same tokens
    (bound: tests/test_mar_reference.py's sampler bound, relative to the largest token), and the shims are gone."""
    b = Bench("cpu", torch.float32, repeats=3, budget_s=5.0, progress=False)
    bs.bench_mar_reference(b, MAR_REFERENCE_CODE, TINY_MAR, batches=(2,), steps=(3,))
    assert b.results["mar_reference/status"]["commit"] == "fe470ac"
    assert {f"mar_reference/b2_s3_{v}" for v in ("ours", "reference", "cached")} <= set(b.results)
    ratio = b.results["mar_reference/ratio_b2_s3"]
    assert ratio["ours_over_reference_min"] <= ratio["ours_over_reference_median"] <= ratio["ours_over_reference_max"]
    assert ratio["cached_min"] <= ratio["cached"] <= ratio["cached_max"]
    agreement = b.results["mar_reference/agreement"]
    assert agreement["relative"] <= 1e-5 and agreement["max_abs_token"] > 0 and agreement["steps"] == 3
    assert "models" not in sys.modules and "diffusion" not in sys.modules and "torchvision" not in sys.modules
    assert torch.Tensor.cuda is torch._C.TensorBase.cuda and torch.randn is torch._C._VariableFunctions.randn

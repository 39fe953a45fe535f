"""The GPU scripts, run in their CPU modes at small sizes, so that the first GPU session can fail only for GPU
reasons: ``examples/gpu_smoke.sh`` (SMOKE_DEVICE=cpu) and ``examples/bench_gpu.sh`` (BENCH_DEVICE=cpu, --tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parscale_ear_hf.commands import cli_process

ROOT = Path(__file__).resolve().parents[2]
# Minutes, not seconds: run by `make rehearsal` (REHEARSAL=1), skipped by `make test`.
pytestmark = pytest.mark.skipif(os.environ.get("REHEARSAL") != "1", reason="run by `make rehearsal` (REHEARSAL=1)")


def bash(script: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / script)],
        env={**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "2", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's digits and their latents (encoded by the shipped model's VAE), as train_demo.sh makes them."""
    root = tmp_path_factory.mktemp("demo")
    for argv in (
        ["prepare-data", "--output", str(root / "mnist_demo")],
        ["cache-latents", "--vae", str(ROOT / "models/mnist_demo"), "--vae-subfolder", "vae", "--dataset",
         str(root / "mnist_demo"), "--split", "train", "--no-hflip", "--output-dir", str(root / "latents"), "--cpu"],
    ):  # fmt: skip
        command, env = cli_process(*argv)
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_gpu_smoke_runs_in_cpu_mode(demo_data, tmp_path):
    out = tmp_path / "smoke"
    bash("gpu_smoke.sh", SMOKE_DEVICE="cpu", OUT_DIR=str(out), LATENTS=str(demo_data / "latents"),
         DATA=str(demo_data / "mnist_demo"))  # fmt: skip
    written = sorted(p.name for p in out.glob("*.json"))
    assert written == ["benchmark_sampling_gpu.json", "eval_20_cached.json", "eval_20_exact.json", "train_bf16.json"]
    train = json.loads((out / "train_bf16.json").read_text())
    assert train["device"].startswith("cpu: ") and train["steps"] == 4
    for mode in ("exact", "cached"):
        assert json.loads((out / f"eval_20_{mode}.json").read_text())["samples"]["total"] == 20


def test_bench_gpu_runs_in_cpu_mode_without_touching_results(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "results").glob("benchmark_gpu*")}
    bash("bench_gpu.sh", BENCH_DEVICE="cpu", BENCH_OUT=str(tmp_path / "bench"))
    record = json.loads((tmp_path / "bench" / "results" / "benchmark_gpu.json").read_text())
    assert record["profile"] == "gpu" and record["sizes"].startswith("tiny")
    assert {"pipeline/full_image", "dit/ratio", "flops/matmul_peak"} <= set(record["measurements"])
    assert "GPU profile" in (tmp_path / "bench" / "docs" / "benchmarks.md").read_text()
    speed = json.loads((tmp_path / "bench" / "results" / "sampling_speed_gpu.json").read_text())
    assert speed["sizes"].startswith("tiny") and len(speed["rows"]) == 3 * 2 * 2 * 2  # models, P, modes, batches
    assert "**Measured** (tiny" in (tmp_path / "bench" / "docs" / "benchmarks.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "results").glob("benchmark_gpu*")} == before

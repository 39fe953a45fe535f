"""The path to ImageNet, rehearsed on CPU at tiny data sizes with the real shapes: the commands a user runs.

A few dozen JPEGs of mixed sizes with labels over 1,000 classes (``imagenet_like.py``), then, each as a
``parscale-ear`` command in its own process: LiteVAE training at its ImageNet-256 config (and ``--resume``),
latent caching streamed from webdataset shards with the ADM centre crop and h-flips, the EAR-B generator at its
default shapes in bf16 (and ``--resume``), a 256x256 sample, and evaluation against a reference in ADM's npz
layout; then caching, training and evaluation again under ``torchrun --nproc_per_node 2``. With a checkout of
LTH14/mar beside the repository, its ``fid_stats/adm_in256_stats.npz`` is read as the reference too.

Run by ``make rehearsal`` (REHEARSAL=1); each step's wall time and the peak memory of its process are written
to $REHEARSAL_REPORT when set.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from parscale_ear_hf.commands import cli_process

from imagenet_like import NUM_CLASSES, write_imagenet_like

ROOT = Path(__file__).resolve().parents[2]
# Minutes, not seconds: run by `make rehearsal` (REHEARSAL=1), skipped by `make test`.
pytestmark = pytest.mark.skipif(os.environ.get("REHEARSAL") != "1", reason="run by `make rehearsal` (REHEARSAL=1)")
MAR_STATS = Path(os.environ.get("MAR_CODE", ROOT.parent / "mar")) / "fid_stats" / "adm_in256_stats.npz"
TIMINGS: dict[str, dict] = {}


def run(name: str, *argv: str, processes: int = 1, cwd: Path | None = None) -> str:
    """``parscale-ear <argv>`` in a fresh process (``torchrun`` for several); returns its output, recording time and
    peak memory under ``name``."""
    command, env = cli_process(*argv)
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", *command[command.index("-m") + 1 :]]  # fmt: skip
    env = {**env, "OMP_NUM_THREADS": str(max(1, 2 // processes)), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=1800)
    TIMINGS[name] = {
        "seconds": round(time.perf_counter() - start, 1),
        # The largest resident set of any child waited for so far (Linux: KiB).
        "peak_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "processes": processes,
    }
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    yield root
    report = os.environ.get("REHEARSAL_REPORT")
    if report:
        total = round(sum(t["seconds"] for t in TIMINGS.values()), 1)
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps({"steps": TIMINGS, "total_seconds": total}, indent=2) + "\n")


@pytest.fixture(scope="module")
def data(work):
    return write_imagenet_like(work / "data", count=24)


def test_vae_trains_at_the_imagenet_config_and_resumes(work, data):
    common = ["train-vae", "--dataset", str(data["parquet"]), "--output-dir", str(work / "vae"),
              "--vae-config", str(ROOT / "examples/configs/litevae_in256.json"), "--batch-size", "1",
              "--checkpoint-every", "1", "--log-every", "1", "--scaling-images", "4", "--eval-batch-size", "2",
              "--cpu"]  # fmt: skip
    run("train-vae", *common, "--max-steps", "2")
    run("train-vae --resume", *common, "--max-steps", "3", "--resume", "latest")
    config = json.loads((work / "vae" / "vae" / "config.json").read_text())
    assert (config["sample_size"], config["latent_channels"], config["levels"]) == (256, 32, 4)
    steps = [line["step"] for line in log(work / "vae" / "train_vae_log.jsonl") if "loss" in line]
    assert steps == [1, 2, 3]


def test_latents_stream_from_webdataset_shards_with_hflips(work, data):
    run("cache-latents (streamed, hflip)", "cache-latents", "--vae", str(work / "vae" / "vae"),
        "--dataset", str(data["webdataset"]), "--streaming", "--image-column", "jpg", "--label-column", "cls",
        "--hflip", "--batch-size", "4", "--output-dir", str(work / "latents"), "--cpu")  # fmt: skip
    info = json.loads((work / "latents" / "cache_info.json").read_text())
    assert (info["count"], info["grid_size"], info["latent_channels"], info["hflip"]) == (24, 16, 32, True)
    assert info["num_classes"] == NUM_CLASSES  # the labels reach class 999


def test_the_default_generator_trains_in_bf16_and_resumes(work):
    common = ["train", "--latents", str(work / "latents"), "--model-config", str(ROOT / "examples/configs/ear_b.json"),
              "--output-dir", str(work / "gen"), "--batch-size", "2", "--mixed-precision", "bf16",
              "--checkpoint-every", "1", "--log-every", "1", "--lr", "1e-4", "--warmup-steps", "1",
              "--sample-images", "2", "--sample-steps", "2", "--cpu"]  # fmt: skip
    run("train (EAR-B, bf16)", *common, "--max-steps", "2")
    run("train --resume", *common, "--max-steps", "3", "--resume", "latest")
    losses = [line["loss"] for line in log(work / "gen" / "train_log.jsonl")]
    assert len(losses) == 3 and np.isfinite(losses).all()
    config = json.loads((work / "gen" / "pipeline" / "transformer" / "config.json").read_text())
    assert (config["hidden_size"], config["num_layers"], config["grid_size"]) == (768, 24, 16)


def test_a_256_pixel_image_is_sampled(work):
    run("generate", "generate", "--model", str(work / "gen" / "pipeline"), "--labels", "0", "999",
        "--steps", "2", "--no-grid", "--output", str(work / "images"), "--device", "cpu")  # fmt: skip
    images = sorted((work / "images").glob("*.png"))
    assert [p.name for p in images] == ["00000_class0.png", "00001_class999.png"]
    assert all(PIL.Image.open(p).size == (256, 256) for p in images)


def adm_reference(work, data) -> Path:
    """An ADM-layout reference of the dataset's images (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, ``arr_0``)."""
    from parscale_ear_hf.data import center_crop_arr, load_image_dataset
    from parscale_ear_hf.evaluation import dataset_features, feature_statistics, load_extractor

    dataset = load_image_dataset(data["imagefolder"])
    extractor = load_extractor("inception")
    features, spatial = dataset_features(dataset, image_size=256, channels=3, extractor=extractor, progress=False)
    arr_0 = np.stack([np.asarray(center_crop_arr(e["image"].convert("RGB"), 256)) for e in dataset])
    mu, sigma = feature_statistics(features)
    mu_s, sigma_s = feature_statistics(spatial)
    path = work / "VIRTUAL_tiny256_labeled.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=arr_0)
    return path


def test_evaluation_against_an_adm_npz_reference(work, data):
    reference = adm_reference(work, data)
    run("eval (ADM npz)", "eval", "--model", str(work / "gen" / "pipeline"), "--reference", str(reference),
        "--extractor", "inception", "--classes", "0", "999", "--num-samples", "10", "--batch-size", "5",
        "--steps", "2", "--output-dir", str(work / "eval"), "--cpu")  # fmt: skip
    record = json.loads((work / "eval" / "results.json").read_text())
    metrics = record["metrics"]
    assert {"fid", "sfid", "precision", "recall"} <= set(metrics) and np.isfinite(metrics["fid"])
    assert record["samples"]["classes"] == [0, 999] and record["samples"]["total"] == 10


def test_the_same_under_two_processes(work, data):
    run("cache-latents x2", "cache-latents", "--vae", str(work / "vae" / "vae"), "--dataset",
        str(data["webdataset"]), "--streaming", "--image-column", "jpg", "--label-column", "cls", "--hflip",
        "--batch-size", "4", "--output-dir", str(work / "latents2"), "--cpu", processes=2)  # fmt: skip
    info = json.loads((work / "latents2" / "cache_info.json").read_text())
    assert (info["num_shards"], info["count"], info["num_classes"]) == (2, 24, NUM_CLASSES)
    run("train x2 (bf16)", "train", "--latents", str(work / "latents2"), "--model-config",
        str(ROOT / "examples/configs/ear_b.json"), "--output-dir", str(work / "gen2"), "--batch-size", "2",
        "--mixed-precision", "bf16", "--max-steps", "1", "--checkpoint-every", "1", "--lr", "1e-4",
        "--warmup-steps", "1", "--sample-images", "2", "--sample-steps", "2", "--cpu", processes=2)  # fmt: skip
    assert len(log(work / "gen2" / "train_log.jsonl")) == 1
    run("eval x2", "eval", "--model", str(work / "gen2" / "pipeline"), "--reference",
        str(work / "VIRTUAL_tiny256_labeled.npz"), "--extractor", "inception", "--classes", "0", "999",
        "--num-samples", "10", "--batch-size", "5", "--steps", "2", "--output-dir", str(work / "eval2"), "--cpu",
        processes=2)  # fmt: skip
    assert np.isfinite(json.loads((work / "eval2" / "results.json").read_text())["metrics"]["fid"])


@pytest.mark.skipif(not MAR_STATS.is_file(), reason=f"no LTH14/mar checkout with {MAR_STATS} (set MAR_CODE)")
def test_adm_imagenet_statistics_from_a_mar_checkout_are_read_as_the_reference(work):
    run("eval (ADM ImageNet-256 stats)", "eval", "--model", str(work / "gen" / "pipeline"), "--reference",
        str(MAR_STATS), "--extractor", "inception", "--classes", "0", "999", "--num-samples", "10",
        "--batch-size", "5", "--steps", "2", "--output-dir", str(work / "eval_adm"), "--cpu")  # fmt: skip
    record = json.loads((work / "eval_adm" / "results.json").read_text())
    assert np.isfinite(record["metrics"]["fid"]) and "precision" not in record["metrics"]  # mu / sigma only

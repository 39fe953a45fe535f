"""Generator training: exact resume after SIGKILL, atomic checkpoints, two processes, bad input."""

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from parscale_ear_hf import LiteVAE, cli
from parscale_ear_hf.training.checkpointing import (
    FORMAT,
    JsonlLog,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
)
from parscale_ear_hf.training.generator import add_arguments, run
from parscale_ear_hf.training.latent_cache import encode_to_cache, write_cache_info

from conftest import TINY_VAE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_CONFIG = {
    "lite_hybrid": {"coarse_grid_size": 2, "hidden_dim": 16, "num_heads": 2},
    "transformer": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "buffer_size": 4, "parscale_n": 2},
    "energy_head": {"width": 32, "depth": 2, "noise_dim": 8},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny VAE, a latent cache of 48 random 16x16 images in 10 classes, and a model config."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    vae = LiteVAE(**TINY_VAE_CONFIG).eval()
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(48)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])}
    )
    dataset = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(48)]}, features=features)
    vae = LiteVAE.from_pretrained(root / "vae")
    encode_to_cache(vae, dataset, root / "latents", image_size=16, channels=3, batch_size=16, hflip=True)
    write_cache_info(
        root / "latents",
        1,
        vae=str(root / "vae"),
        scaling_factor=1.5,
        shift_factor=0.1,
        hflip=True,
        dataset="synthetic",
        split="train",
        image_size=16,
    )
    (root / "model.json").write_text(json.dumps(TINY_MODEL_CONFIG))
    return root


def train_args(workspace, output_dir, *extra):
    return [
        "--latents",
        str(workspace / "latents"),
        "--model-config",
        str(workspace / "model.json"),
        "--output-dir",
        str(output_dir),
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--checkpoint-every",
        "3",
        "--warmup-steps",
        "2",
        "--ema-decay",
        "0.9",
        "--sample-steps",
        "2",
        "--cpu",
        *extra,
    ]


def parse(argv):
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def losses(output_dir):
    return {r["step"]: r["loss"] for r in JsonlLog(Path(output_dir) / "train_log.jsonl").read()}


def script_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def test_resume_after_sigkill_continues_exactly(workspace, tmp_path):
    steps = ["--max-steps", "30"]  # ample steps after the kill point, so the kill always lands mid-run
    reference = tmp_path / "reference"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_ear.py"), *train_args(workspace, reference), *steps],
        check=True,
        env=script_env(),
        capture_output=True,
        timeout=300,
    )

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "examples" / "train_ear.py"), *train_args(workspace, killed), *steps]
    proc = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and max(losses(killed), default=0) < 8:  # past the step-6 checkpoint
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(losses(killed)) < 30, "the run finished before it could be killed"
    assert latest_checkpoint(killed / "checkpoints") is not None

    subprocess.run(cmd + ["--resume", "latest"], check=True, env=script_env(), capture_output=True, timeout=300)
    assert losses(killed) == losses(reference)  # every step's loss, bit for bit
    for component in ("lite_hybrid", "transformer", "energy_head"):
        a = load_file(reference / "pipeline" / component / "diffusion_pytorch_model.safetensors")
        b = load_file(killed / "pipeline" / component / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component


def test_interrupted_checkpoint_is_never_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "checkpoint-00000003").mkdir(parents=True)
    (root / "checkpoint-00000003" / "trainer_state.json").write_text(json.dumps({"format": FORMAT, "files": []}))
    (root / ".tmp-checkpoint-00000006").mkdir()  # a save killed half-way
    (root / "checkpoint-00000009").mkdir()  # no trainer_state.json: incomplete
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000003"]
    assert resolve_resume("latest", root).name == "checkpoint-00000003"
    assert resolve_resume(None, root) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(root / "checkpoint-00000009"), root)


def test_resume_without_checkpoint_fails_before_training(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(parse(train_args(workspace, tmp_path / "fresh", "--max-steps", "2", "--resume", "latest")))
    assert not (tmp_path / "fresh" / "train_log.jsonl").exists()


def test_fresh_start_never_overwrites_a_previous_run(workspace, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "checkpoint-00000003").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-00000003" / "trainer_state.json").write_text('{"step": 3}')
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match="--resume latest"):
        run(parse(train_args(workspace, out, "--max-steps", "2")))
    assert (out / "train_log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


class WritesMarker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_planted_pickle_is_refused_and_never_run(workspace, tmp_path):
    out = tmp_path / "out"
    run(parse(train_args(workspace, out, "--max-steps", "3")))
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint.name == "checkpoint-00000003"
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin", ".pt", ".pth")]

    pickle.loads(pickle.dumps(WritesMarker(tmp_path / "probe")))
    assert (tmp_path / "probe").exists()  # the planted file would run code if it were unpickled
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(WritesMarker(tmp_path / "marker")))
    log = (out / "train_log.jsonl").read_text()
    expected = r"checkpoint '.*checkpoint-00000003' .* never writes: \['custom_checkpoint_0.pkl'\]"
    with pytest.raises(ValueError, match=expected):
        run(parse(train_args(workspace, out, "--max-steps", "6", "--resume", "latest")))
    assert not (tmp_path / "marker").exists()
    assert (out / "train_log.jsonl").read_text() == log  # refused before any step


def test_cli_train_writes_its_arguments(workspace, tmp_path):
    out = tmp_path / "out"
    cli.main(["train", *train_args(workspace, out, "--max-steps", "2")])
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["args"]["max_steps"] == 2 and "func" not in run_config["args"]
    assert run_config["latent_cache"]["grid_size"] == 4
    assert (out / "pipeline" / "model_index.json").is_file()


def test_grad_clip_zero_disables_clipping(workspace, tmp_path):
    models = [
        run(parse(train_args(workspace, tmp_path / name, "--max-steps", "2", "--grad-clip", clip)))
        for name, clip in (("off", "0"), ("huge", "1e9"))
    ]
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


FLOAT_FLAGS = (
    "--lr",
    "--head-lr-scale",
    "--weight-decay",
    "--grad-clip",
    "--ema-decay",
    "--energy-lambda",
    "--sample-guidance",
)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--sample-guidance", "0.5"),
        ("--sample-steps", "0"),
        ("--sample-steps", "17"),  # the cache has 4x4 = 16 tokens
        ("--num-head-samples", "0"),
        ("--num-head-samples", "1"),
        ("--grad-clip", "-1"),
        ("--head-lr-scale", "-0.25"),
        ("--energy-lambda", "-0.1"),
        ("--energy-lambda", "1.5"),
        ("--weight-decay", "-0.01"),
        ("--lr", "0"),
        ("--log-every", "0"),
        ("--seed", "-1"),
        ("--batch-size", "64"),  # the cache has 48 examples
        *[(flag, value) for flag in FLOAT_FLAGS for value in ("inf", "nan")],
    ],
)
def test_bad_arguments_fail_before_anything_is_loaded_or_written(workspace, tmp_path, monkeypatch, flag, value):
    def no_vae(path):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("parscale_ear_hf.training.latent_cache.load_vae", no_vae)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run(parse(train_args(workspace, out, "--max-steps", "2", flag, value)))
    parsed = float(value) if flag in FLOAT_FLAGS else int(value)
    message = str(error.value)
    assert f"`{flag}`" in message and f"got {parsed!r}" in message, message
    assert not out.exists()


def test_model_config_that_does_not_fit_the_data_is_rejected(workspace, tmp_path):
    bad = {**TINY_MODEL_CONFIG, "transformer": {**TINY_MODEL_CONFIG["transformer"], "grid_size": 8}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    args = train_args(workspace, tmp_path / "out", "--max-steps", "2")
    args[args.index("--model-config") + 1] = str(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"transformer.grid_size=8 does not fit the latent cache .*grid_size=4"):
        run(parse(args))


def test_training_lowers_the_loss_and_saves_a_pipeline(workspace, tmp_path):
    from parscale_ear_hf import ParScaleEARPipeline

    out = tmp_path / "out"
    run(
        parse(
            train_args(
                workspace, out, "--max-steps", "40", "--lr", "3e-3", "--checkpoint-every", "40", "--batch-size", "16"
            )
        )
    )
    log = losses(out)
    first, last = np.mean([log[s] for s in (1, 2, 3)]), np.mean([log[s] for s in (38, 39, 40)])
    assert last < first, (first, last)
    pipe = ParScaleEARPipeline.from_pretrained(out / "pipeline")
    assert pipe.transformer.config.parscale_n == 2 and pipe.id2label[3] == "c3"
    assert (out / "samples" / "final.png").is_file()


def test_two_processes_hold_identical_weights_also_after_resuming(workspace, tmp_path):
    out = tmp_path / "dist"
    for port, extra in (("29533", ["--max-steps", "3"]), ("29534", ["--max-steps", "5", "--resume", "latest"])):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(ROOT / "tests" / "dist_worker.py"),
            *train_args(workspace, out, *extra),
        ]
        proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # Both ranks load the checkpoint: a rank that kept its initial weights would differ.
        digests = [(out / f"weights-rank{r}.sha256").read_text() for r in (0, 1)]
        assert digests[0] == digests[1]
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]

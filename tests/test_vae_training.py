"""`parscale_ear_hf.training.vae`: the losses, the learning-rate schedule, a short run, exact resume (also from an
interim checkpoint), latent scale, a fresh start keeps an earlier run's log, errors."""

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from parscale_ear_hf import LiteVAE
from parscale_ear_hf.data import image_loader
from parscale_ear_hf.training import checkpointing
from parscale_ear_hf.training import vae as vae_training
from parscale_ear_hf.training.objectives import wavelet_highfreq_loss
from parscale_ear_hf.training.recipe import lr_at_step
from parscale_ear_hf.training.vae import LOG_FILE, add_arguments, run

# A 16x16 grayscale LiteVAE with a 4x4x4 latent.
TINY_FLAGS = (
    "--image-size 16 --channels 1 --levels 2 --latent-channels 4 --encoder-channels 8 8 "
    "--encoder-layers-per-level 1 --aggregation-channels 16 --aggregation-layers 1 --decoder-channels 8 16 16 "
    "--decoder-layers-per-block 1 --norm-num-groups 4"
).split()


def synthetic_images(count, seed):
    """16x16 grayscale images of a bright rectangle at a random place on a dark background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        arr = np.full((16, 16), 20, dtype=np.uint8)
        top, left = rng.integers(0, 10, size=2)
        height, width = rng.integers(3, 7, size=2)
        arr[top : top + height, left : left + width] = 230
        images.append(PIL.Image.fromarray(arr, mode="L"))
    return images


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rects") / "rects"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    splits = {
        name: datasets.Dataset.from_dict(
            {"image": synthetic_images(count, seed), "label": [i % 2 for i in range(count)]}, features
        )
        for name, count, seed in (("train", 48, 0), ("heldout", 16, 1))
    }
    datasets.DatasetDict(splits).save_to_disk(path)
    return path


def make_args(dataset_dir, output_dir, *extra):
    parser = add_arguments(argparse.ArgumentParser())
    return parser.parse_args(
        ["--dataset", str(dataset_dir), "--output-dir", str(output_dir), "--batch-size", "8", "--lr", "3e-3"]
        + TINY_FLAGS
        + [str(e) for e in extra]
    )


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / LOG_FILE).read_text().splitlines()]


def test_wavelet_loss_zero_for_identical_positive_for_blurred():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert wavelet_highfreq_loss(images, images.clone()) == 0
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    assert wavelet_highfreq_loss(blurred, images) > 0.1
    # A constant offset changes only the low band.
    assert wavelet_highfreq_loss(images + 0.5, images) < 1e-6


def test_the_vae_trains_at_the_recipes_learning_rate_schedule(dataset_dir, tmp_path):
    """Linear warm-up from 0 (update 0 at lr 0), then a half cosine down to --min-lr, as `lr_at_step` says."""
    out = tmp_path / "out"
    flags = ("--max-steps", 6, "--log-every", 1, "--checkpoint-every", 0, "--lr-schedule", "cosine")
    run(make_args(dataset_dir, out, *flags, "--lr-warmup-steps", 2, "--min-lr", "1e-4"))
    logged = [r["lr"] for r in read_log(out) if "lr" in r]
    schedule = dict(lr=3e-3, warmup_steps=2, max_steps=6, schedule="cosine", min_lr=1e-4)
    assert logged == [lr_at_step(s, **schedule) for s in range(6)]
    assert logged == pytest.approx(
        [0.0, 1.5e-3, 3e-3, 3e-3 - 2.9e-3 / 2 * (1 - 0.5**0.5), (3e-3 + 1e-4) / 2, 1e-4 + 2.9e-3 / 2 * (1 - 0.5**0.5)],
        abs=1e-12,
    )


def test_training_reduces_the_loss_and_saves_a_scaled_vae(dataset_dir, tmp_path):
    out = tmp_path / "run"
    results_file = tmp_path / "results" / "vae.json"
    summary = run(
        make_args(
            dataset_dir, out, "--max-steps", 30, "--log-every", 1, "--eval-split", "heldout", "--eval-every", 15,
            "--checkpoint-every", 0, "--results-file", results_file,
        )
    )  # fmt: skip
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    psnrs = [r["heldout_psnr"] for r in read_log(out) if "heldout_psnr" in r]
    assert len(psnrs) == 2 and psnrs[-1] == summary["heldout_psnr"] and psnrs[-1] > psnrs[0]

    vae = LiteVAE.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(summary["shift_factor"])
    # On the images it was measured on, scaled posterior samples have mean 0 and std 1.
    train = datasets.load_from_disk(dataset_dir)["train"]
    images = next(iter(image_loader(train, 16, 1, batch_size=len(train))))["pixel_values"]
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(123))
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(scaled.mean().item()) < 0.05 and scaled.std().item() == pytest.approx(1.0, abs=0.05)

    record = json.loads(results_file.read_text())
    assert record["metric"] == "vae_heldout_psnr" and record["value"] == summary["heldout_psnr"]
    assert record["split"] == "heldout" and record["steps"] == 30 and record["model"] == str(out / "vae")
    assert "provenance" in record
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["vae_config"]["latent_channels"] == 4 and run_config["args"]["max_steps"] == 30


class Killed(Exception):
    pass


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("interim, precision", [(False, "no"), (True, "no"), (True, "bf16")])
def test_resume_after_a_kill_continues_exactly(dataset_dir, tmp_path, monkeypatch, interim, precision):
    flags = (
        "--max-steps", 6, "--checkpoint-every", 3, "--gradient-accumulation-steps", 2, "--log-every", 1,
        "--eval-split", "heldout", "--eval-every", 2, "--lr-schedule", "cosine", "--lr-warmup-steps", 2,
        "--mixed-precision", precision,
    )  # fmt: skip
    run(make_args(dataset_dir, tmp_path / "straight", *flags, "--checkpoint-minutes", 0))

    # Kill the second run before its 6th step: steps 4 and 5 are logged after the checkpoint at 3. With
    # `interim`, a clock that reads a minute later each time saves interim checkpoints after steps 4 and 5 too.
    def killed_before_step_6(step, **kwargs):
        if step == 5:
            raise Killed
        return lr_at_step(step, **kwargs)

    monkeypatch.setattr(vae_training, "lr_at_step", killed_before_step_6)
    monkeypatch.setattr(checkpointing, "monotonic", itertools.count(0.0, 60.0).__next__)
    minutes = ("--checkpoint-minutes", 1 if interim else 0)
    with pytest.raises(Killed):
        run(make_args(dataset_dir, tmp_path / "resumed", *flags, *minutes))
    monkeypatch.undo()
    assert max(r["step"] for r in read_log(tmp_path / "resumed")) == 5
    latest = checkpointing.latest_checkpoint(tmp_path / "resumed" / "checkpoints")
    assert (latest.name, checkpointing.read_checkpoint_state(latest)["interim"]) == (
        ("checkpoint-00000005", True) if interim else ("checkpoint-00000003", False)
    )
    run(make_args(dataset_dir, tmp_path / "resumed", *flags, *minutes, "--resume", "latest"))

    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "straight")
    weights = [
        load_file(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors") for name in ("straight", "resumed")
    ]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_resume_latest_without_checkpoint_raises_before_training(dataset_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume latest: no complete checkpoint"):
        run(make_args(dataset_dir, tmp_path / "out", "--resume", "latest"))
    assert not (tmp_path / "out").exists()


def test_refuses_to_start_over_existing_checkpoints_or_resume_another_config(dataset_dir, tmp_path):
    run(make_args(dataset_dir, tmp_path / "out", "--max-steps", 1, "--checkpoint-every", 1))
    files = sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "checkpoint-00000001").iterdir())
    assert files == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "trainer_state.json"]
    with pytest.raises(FileExistsError, match="already holds checkpoints; pass --resume latest"):
        run(make_args(dataset_dir, tmp_path / "out", "--max-steps", 2))
    with pytest.raises(ValueError, match="was trained with the LiteVAE config"):
        run(make_args(dataset_dir, tmp_path / "out", "--max-steps", 2, "--resume", "latest", "--latent-channels", 8))


def test_a_fresh_start_moves_an_earlier_runs_log_aside(dataset_dir, tmp_path, capsys):
    """A run killed before its first checkpoint leaves nothing to resume; starting it again keeps its log."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = b'{"step": 10, "loss": 0.5}\n{"step": 20, "lo'
    (out / LOG_FILE).write_bytes(earlier)
    run(make_args(dataset_dir, out, "--max-steps", 1, "--checkpoint-every", 0))
    assert (out / "earlier-runs" / "1" / LOG_FILE).read_bytes() == earlier
    assert {r["step"] for r in read_log(out)} == {1}
    assert f"moved its {LOG_FILE} to '{out / 'earlier-runs' / '1'}'" in capsys.readouterr().out


def test_vae_config_file_and_flags(dataset_dir, tmp_path):
    config = tmp_path / "vae.json"
    config.write_text(json.dumps({"latent_channels": 8, "levels": 1, "_class_name": "LiteVAE"}))
    flags = make_args(dataset_dir, tmp_path / "out", "--vae-config", config, "--max-steps", 1, "--checkpoint-every", 0)
    flags.levels = flags.latent_channels = None  # from the file; the other flags override it
    flags.encoder_channels, flags.decoder_channels = [8], [8, 16]
    run(flags)
    saved = LiteVAE.from_pretrained(tmp_path / "out" / "vae").config
    assert (saved.latent_channels, saved.levels, saved.sample_size) == (8, 1, 16)


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--dataset", "/no/such/folder"], FileNotFoundError, "`source`='/no/such/folder' does not exist"),
        (["--image-column", "pixels"], ValueError, r"`image_column`='pixels' .* columns are \['image', 'label'\]"),
        (["--eval-split", "val"], ValueError, r"`split`='val' .* available splits: \['heldout', 'train'\]"),
        (["--streaming"], ValueError, "--streaming is not supported for VAE training"),
        (["--batch-size", 64], ValueError, "--batch-size 64 is larger than split 'train' \\(48 images\\)"),
        (["--results-file", "r.json"], ValueError, "--results-file .* needs --eval-split"),
        *[
            ([flag, value], ValueError, rf"`{flag}` must be a finite number (>=|in) .*, got {value}\.")
            for flag, values in (
                ("--lr", ("0.0", "-0.001", "inf", "nan")),
                ("--min-lr", ("-0.001", "0.01", "nan")),  # at most the --lr 3e-3
                ("--weight-decay", ("-0.1", "inf", "nan")),
                ("--max-grad-norm", ("-1.0", "inf", "nan")),
                ("--kl-weight", ("-0.001", "inf", "nan")),
                ("--wavelet-weight", ("-0.5", "inf", "nan")),
                ("--checkpoint-minutes", ("-1.0", "inf", "nan")),
            )
            for value in values
        ],
        *[
            ([flag, value], ValueError, rf"`{flag}` must be an integer >= {minimum}, got {value}\.")
            for flag, value, minimum in (
                ("--max-steps", -1, 1),
                ("--log-every", 0, 1),
                ("--scaling-images", 0, 1),
                ("--eval-batch-size", 0, 1),
                ("--lr-warmup-steps", -1, 0),
                ("--eval-every", -1, 0),
                ("--checkpoint-every", -1, 0),
                ("--num-workers", -1, 0),
                ("--seed", -1, 0),
            )
        ],  # fmt: skip
    ],
)
def test_bad_arguments_fail_before_training(dataset_dir, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        run(make_args(dataset_dir, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_match_one(dataset_dir, tmp_path):
    flags = ["--max-steps", 4, "--checkpoint-every", 2, "--log-every", 1, "--eval-split", "heldout"]
    run(make_args(dataset_dir, tmp_path / "one", *flags))
    two = make_args(dataset_dir, tmp_path / "two", *flags)
    script = Path(__file__).resolve().parents[1] / "examples" / "train_vae.py"
    argv = [
        str(a) for a in ["--dataset", dataset_dir, "--output-dir", tmp_path / "two", "--batch-size", 8, "--lr", two.lr]
    ]
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        + argv + TINY_FLAGS + [str(f) for f in flags],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
    )  # fmt: skip

    # Rank 0 alone writes the log and the checkpoints, which hold no per-process (random) state.
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    checkpoints = [tmp_path / name / "checkpoints" / "checkpoint-00000004" for name in ("one", "two")]
    assert sorted(p.name for p in checkpoints[0].iterdir()) == sorted(p.name for p in checkpoints[1].iterdir())
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    weights = [load_file(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors") for name in ("one", "two")]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-4, rtol=1e-3)

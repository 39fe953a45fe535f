"""`parscale-ear`: every subcommand's --help, info, and generate (grid and single files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from parscale_ear_hf.cli import main
from parscale_ear_hf.info import component_parameter_counts

from conftest import tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "command,flags",
    [
        (
            "generate",
            ["--model", "--labels", "--seed", "--steps", "--guidance", "--temperature", "--output", "--no-grid"],
        ),
        ("train-vae", ["--dataset", "--output-dir", "--resume", "--kl-weight"]),
        ("train", ["--latents", "--model-config", "--resume", "--head-lr-scale", "--parscale-n"]),
        ("info", ["--model", "--json"]),
        (
            "eval",
            ["--model", "--images-per-class", "--num-samples", "--extractor", "--reference", "--inception-weights"],
        ),
        ("eval-vae", ["--vae", "--baseline-split", "--extractor", "--results-file"]),
        ("card", ["--model", "--results", "--model-id"]),
    ],
)
def test_each_subcommand_has_useful_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags), text


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "parscale-ear"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout and "train-vae" in proc.stdout


def test_info_reports_parameter_counts(saved, capsys):
    main(["info", "--model", str(saved), "--json"])
    summary = json.loads(capsys.readouterr().out)
    pipe = tiny_pipeline()
    assert summary["parameters"] == component_parameter_counts(
        pipe.vae, pipe.lite_hybrid, pipe.transformer, pipe.energy_head
    )
    assert summary["image_size"] == 16 and summary["token_grid"] == [4, 4, 4] and summary["num_classes"] == 10


def test_generate_writes_a_labelled_grid(saved, tmp_path):
    out = tmp_path / "grid.png"
    main(
        [
            "generate",
            "--model",
            str(saved),
            "--labels",
            "1",
            "digit 2",
            "7",
            "--images-per-class",
            "2",
            "--steps",
            "4",
            "--output",
            str(out),
        ]
    )
    grid = PIL.Image.open(out)
    assert grid.size == (3 * 16, 2 * (16 + 12))  # 3 columns (labels), 2 rows, a caption strip under each


def test_generate_single_files(saved, tmp_path):
    out = tmp_path / "images"
    main(["generate", "--model", str(saved), "--labels", "3", "4", "--steps", "4", "--no-grid", "--output", str(out)])
    assert sorted(os.listdir(out)) == ["00000_class3.png", "00001_class4.png"]


def test_generate_rejects_a_bad_label(saved, tmp_path):
    with pytest.raises(ValueError, match="class label 12"):
        main(["generate", "--model", str(saved), "--labels", "12", "--output", str(tmp_path / "g.png")])

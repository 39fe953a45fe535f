"""`parscale-ear`: every subcommand's --help, info, generate (grid and single files), flags
refused before loading, and one-line errors (with --debug for the traceback), also in examples/."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from parscale_ear_hf import ParScaleEARPipeline, SamplingCache, cli
from parscale_ear_hf.cli import main
from parscale_ear_hf.commands import run_script
from parscale_ear_hf.info import component_parameter_counts

from conftest import run_example, tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "command,flags",
    [
        ("prepare-data", ["--output", "--image-size", "--seed"]),
        ("cache-latents", ["--vae", "--vae-subfolder", "--dataset", "--output-dir", "--hflip", "--image-size"]),
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
    assert all(flag in text for flag in [*flags, "--debug"]), text


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


def test_an_error_is_one_line_and_debug_shows_it_whole(saved, tmp_path, capsys):
    argv = ["generate", "--model", str(saved), "--labels", "12", "--steps", "4", "--output", str(tmp_path / "g.png")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # after the loading progress bar
    assert line.startswith("parscale-ear generate: error: ParScaleEARPipeline: class label 12 is out of range")
    assert line.endswith("of any shape).") and "Traceback" not in err and "--debug" not in err
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command
        with pytest.raises(ValueError, match="class label 12"):
            main(debug)
    assert not (tmp_path / "g.png").exists()


def test_usage_errors_keep_argparse_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--steps", "4"])  # --model is required
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err


def test_an_unexpected_error_says_how_to_get_the_traceback(saved, monkeypatch, capsys):
    def broken(args):
        return None.config  # a bug, not bad input

    monkeypatch.setattr(cli, "info", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--model", str(saved)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("parscale-ear info: error: 'NoneType' object has no attribute 'config'")
    assert "(AttributeError; rerun with --debug for the traceback)" in err and err.count("\n") == 1
    with pytest.raises(AttributeError):
        main(["--debug", "info", "--model", str(saved)])


def test_ctrl_c_exits_130_quietly(saved, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "info", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--model", str(saved)])
    assert exit_info.value.code == 130 and capsys.readouterr().err == ""


def test_run_script_behaves_like_the_cli(monkeypatch, capsys):
    def parser():
        demo = argparse.ArgumentParser(prog="demo.py")
        demo.add_argument("--value", type=int, default=0)
        return demo

    def func(args):
        raise FileNotFoundError(f"demo: --value {args.value} names no file;\naccepted: an existing one.")

    monkeypatch.setattr(sys, "argv", ["demo.py", "--value", "3"])
    with pytest.raises(SystemExit) as exit_info:
        run_script(parser(), func)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "demo.py: error: demo: --value 3 names no file; accepted: an existing one.\n"
    monkeypatch.setattr(sys, "argv", ["demo.py", "--value", "3", "--debug"])
    with pytest.raises(FileNotFoundError, match="names no file"):
        run_script(parser(), func)


def test_example_script_prints_one_line(saved, tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    command = [sys.executable, str(script), "--model", str(saved), "--steps", "0", "--output", str(tmp_path / "g.png")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "generate.py: error: generate: `--steps` must be an integer >= 1, got 0."


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "`--steps` must be an integer >= 1, got 0"),
        (["--steps", "-3"], "`--steps` must be an integer >= 1, got -3"),
        (["--guidance", "0.5"], "`--guidance` must be a finite number >= 1.0, got 0.5"),
        (["--guidance", "inf"], "`--guidance` must be a finite number >= 1.0, got inf"),
        (["--temperature", "-1"], "`--temperature` must be a finite number >= 0.0, got -1.0"),
        (["--temperature", "nan"], "`--temperature` must be a finite number >= 0.0, got nan"),
        (["--images-per-class", "0"], "`--images-per-class` must be an integer >= 1, got 0"),
        (["--token-share", "0.5"], "--token-share is the token cache's; add --token-cache"),
        (["--cache-refresh-every", "3"], "--cache-refresh-every paces the sampling caches"),
        (["--token-cache", "--token-share", "2"], r"`--token-share` must be a finite number in \[0.0, 1.0\], got 2.0"),
        (["--condition-cache", "--cache-refresh-every", "0"], "`--cache-refresh-every` must be an integer >= 1"),
        # cuda:999 is refused with or without a GPU; on a CPU build, plain "cuda" is too.
        (["--device", "cuda:999"], "`--device` 'cuda:999' is not a device this machine can use"),
        (["--device", "foo"], "`--device` 'foo' is not a device this machine can use"),
    ],
)
def test_generate_refuses_bad_sampling_flags_before_loading(saved, tmp_path, monkeypatch, flags, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(ParScaleEARPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=f"^generate: {message}"):
        main(["--debug", "generate", "--model", str(saved), *flags, "--output", str(tmp_path / "g.png")])


def test_generate_with_caches_and_compiled_step(saved, tmp_path, monkeypatch, capsys):
    seen = {}
    call = ParScaleEARPipeline.__call__

    def spy(self, *args, **kwargs):
        seen["cache"], seen["compiled"] = kwargs["cache"], self._compiled_hidden is not None
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ParScaleEARPipeline, "__call__", spy)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring only: compiling is tested elsewhere
    argv = ["generate", "--model", str(saved), "--labels", "1", "--steps", "6", "--output", str(tmp_path / "g.png")]
    main([*argv, "--token-cache", "--token-share", "0.5", "--cache-refresh-every", "3", "--compile"])
    assert seen == {"cache": SamplingCache(token_share=0.5, condition_cache=False, refresh_every=3), "compiled": True}
    assert "cache SamplingCache(token_cache=True, token_share=0.5" in capsys.readouterr().out
    main(argv)
    assert seen == {"cache": None, "compiled": False}


def test_generate_takes_more_steps_than_tokens_as_the_reference_does(saved, tmp_path):
    """EAR's sampler allows steps that predict nothing; the CLI passes them on instead of refusing."""
    main(["generate", "--model", str(saved), "--labels", "1", "--steps", "17", "--output", str(tmp_path / "g.png")])
    assert (tmp_path / "g.png").is_file()


def test_prepare_data_runs_the_examples_implementation(tmp_path, monkeypatch, capsys):
    from parscale_ear_hf import data

    calls = []

    def fake_prepare(output_dir, image_size, seed):
        calls.append((output_dir, image_size, seed))
        return {"train": [0] * 4, "heldout": [0]}

    monkeypatch.setattr(data, "prepare_mnist_demo", fake_prepare)
    main(["prepare-data", "--output", str(tmp_path / "d"), "--image-size", "36", "--seed", "2"])
    assert calls == [(str(tmp_path / "d"), 36, 2)]
    assert capsys.readouterr().out.strip() == f"{{'train': 4, 'heldout': 1}} -> {tmp_path / 'd'}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--repeats", "0"], "`--repeats` must be an integer >= 1, got 0"),
        (["--budget-s", "0"], "`--budget-s` must be a finite number of seconds above 0, got 0.0"),
        (["--sections", "cache", "--sampling-batches", "1", "0"], "`--sampling-batches` must be an integer >= 1"),
        (["--sections", "quality", "--quality-batch-size", "0"], "`--quality-batch-size` must be an integer >= 1"),
        (["--device", "cuda:999"], "`--device` 'cuda:999' is not a device this machine can use"),
        (["--sections", "batch", "--demo-model", "/nope"], "--demo-model '/nope' is not a pipeline folder"),
        (["--sections", "matmul", "--demo-model", "/nope"], "--demo-model '/nope' is read only by"),
    ],
)
def test_bench_refuses_bad_flags_before_measuring(tmp_path, monkeypatch, capsys, flags, message):
    from research.benchmarks import benchmark

    monkeypatch.setattr(
        benchmark.Bench, "measure", lambda *a, **k: pytest.fail("measured before the flags were checked")
    )
    output = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        run_example("benchmark.py", "--profile", "cpu", "--output", str(output), *flags)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not output.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "cache-latents: `--batch-size` must be an integer >= 1, got 0"),
        (["--num-workers", "-1"], "cache-latents: `--num-workers` must be an integer >= 0, got -1"),
        (["--image-size", "0"], "cache-latents: `--image-size` must be an integer >= 1, got 0"),
    ],
)
def test_cache_latents_refuses_bad_flags_before_loading(saved, tmp_path, monkeypatch, capsys, flags, message):
    from parscale_ear_hf.training import latent_cache

    monkeypatch.setattr(latent_cache, "load_vae", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    argv = ["cache-latents", "--vae", str(saved), "--vae-subfolder", "vae", "--dataset", str(tmp_path / "d"),
            "--output-dir", str(tmp_path / "c")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "c").exists()

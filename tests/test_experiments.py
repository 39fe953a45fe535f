"""The evidence grid (`examples/experiments.py`): its cells, resumable runs over seeds with per-stage results,
locking between two drivers, the length pilot, and the report's means, spreads and verdicts; MAR's
DiffusionHead trained by `parscale-ear train`."""

import argparse
import inspect
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale_ear_hf import DiffusionHead, EARTransformer, EnergyHead, ParScaleEARPipeline
from parscale_ear_hf.training import generator
from parscale_ear_hf.training.objectives import EARTrainingModel
from research.evidence_grid import experiments as ex

from conftest import make_latent_workspace

TINY_BASE = {
    "lite_hybrid": {"coarse_grid_size": 2, "hidden_dim": 8, "num_heads": 2},
    "transformer": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "buffer_size": 2},
    "energy_head": {"width": 16, "depth": 1, "noise_dim": 4},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A latent cache of 64 random images (the grid's batch) and a tiny base model config."""
    root = tmp_path_factory.mktemp("grid")
    make_latent_workspace(root, 64)
    (root / "base.json").write_text(json.dumps(TINY_BASE))
    return root


def grid_args(workspace, *extra):
    argv = ["--latents", str(workspace / "latents"), "--base-config", str(workspace / "base.json"),
            "--work-dir", str(workspace / "runs"), "--results-dir", str(workspace / "results" / "experiments"),
            "--steps", "2", "--checkpoint-every", "1", "--images-per-class", "1", "--eval-batch-size", "5",
            "--classifier", str(workspace / "clf"), "--reference-cache-dir", str(workspace / "refs"),
            "--dataset", str(workspace / "data"), "--split", "train", "--inception-extractor", "digit",
            *extra]  # fmt: skip
    return ex.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def in_process(argv, log_path):
    """`run_command` without a new interpreter (the suite's time): the same command, the same error type."""
    from parscale_ear_hf import cli

    try:
        cli.main(argv)
    except SystemExit as error:
        if error.code:
            raise RuntimeError(f"`parscale-ear {argv[0]}` failed (exit {error.code})") from error


@pytest.fixture(scope="module")
def grid(workspace):
    """lh_off at seeds 0 and 1, the diffusion head and the DiT at seed 0 (the diffusion head with 5 DDPM
    steps: a test-sized cell)."""
    cells = dict(ex.CELLS_BY_NAME)
    with pytest.MonkeyPatch.context() as mp:
        head = {"width": 8, "depth": 1, "num_sampling_steps": 5}
        small = ex.Cell("diffusion_head", "diffusion", flags=("--head-lr-scale", "1.0"), curve=True,
                        config={"energy_head": None, "diffusion_head": head})  # fmt: skip
        mp.setitem(ex.CELLS_BY_NAME, "diffusion_head", small)
        mp.setattr(ex, "CELLS", tuple(small if c.name == "diffusion_head" else c for c in ex.CELLS))
        mp.setattr(ex, "CURVE_STEPS", (1,))
        mp.setattr(ex, "EVAL_STEPS", 2)
        mp.setattr(ex, "run_command", in_process)
        outcome = ex.run(grid_args(workspace, "--cells", "lh_off", "--seeds", "0", "1"))
        outcome.update(ex.run(grid_args(workspace, "--cells", "diffusion_head", "dit", "--seeds", "0")))
    assert cells.keys() == ex.CELLS_BY_NAME.keys()
    return outcome


def record(workspace, cell, seed):
    return json.loads((workspace / "results" / "experiments" / cell / f"seed{seed}.json").read_text())


# ------------------------------------------------------------------------------ the cells


def test_cells_cover_the_issue_and_differ_only_where_they_should():
    names = {c.name for c in ex.CELLS}
    assert names == {"lh_off", "lh_coarse", "lh_fine", "lh_both", "lh_both_exact", "p2", "p4", "p1_wide",
                     "p1_deep", "diffusion_head", "dit"}  # fmt: skip
    base = json.loads(open("examples/configs/mnist_demo_generator.json").read())
    assert ex.model_config(ex.CELLS_BY_NAME["lh_both"], base) == base
    exact = ex.model_config(ex.CELLS_BY_NAME["lh_both_exact"], base)
    for section, fields in ex.EXACT_ARCHITECTURE.items():
        assert {k: base[section][k] for k in fields} != fields  # each a pin of the base config, changed
        assert exact[section] == {**base[section], **fields}  # and nothing else
    wide = ex.model_config(ex.CELLS_BY_NAME["p1_wide"], base)
    assert wide["transformer"]["hidden_size"] == 256 and wide["transformer"]["num_layers"] == 6
    assert ex.model_config(ex.CELLS_BY_NAME["p1_deep"], base)["transformer"]["num_layers"] == 24
    head = ex.model_config(ex.CELLS_BY_NAME["diffusion_head"], base)
    assert "energy_head" not in head and head["diffusion_head"]["num_sampling_steps"] == 100
    assert head["transformer"] == base["transformer"]  # the same backbone
    assert base == json.loads(open("examples/configs/mnist_demo_generator.json").read())  # not changed in place


def test_the_wider_and_deeper_cells_match_four_streams_in_backbone_flops():
    from torch.utils.flop_counter import FlopCounterMode

    from parscale_ear_hf.models.ear_transformer import EARTransformer

    base = json.loads(open("examples/configs/mnist_demo_generator.json").read())["transformer"]

    def flops(**changes):
        torch.manual_seed(0)
        t = EARTransformer(**{**base, **changes, "in_channels": 4, "grid_size": 8, "num_classes": 10})
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            t(torch.randn(2, 64, 4), torch.tensor([0, 1]), torch.ones(2, 64, dtype=torch.bool))
        return counter.get_total_flops()

    p4 = flops(parscale_n=4)
    for cell in ("p1_wide", "p1_deep"):
        changes = ex.CELLS_BY_NAME[cell].config["transformer"]
        assert 0.9 < flops(**changes) / p4 < 1.1, cell
    assert flops() < p4 / 3  # and P = 1 itself is far cheaper


def test_train_commands_carry_the_seed_the_recipe_and_the_cells_flags(workspace, tmp_path):
    args = grid_args(workspace)
    command = ex.train_command(ex.CELLS_BY_NAME["lh_coarse"], 2, args, tmp_path / "c" / "train")
    assert command[0] == "train" and command[command.index("--seed") + 1] == "2"
    assert command[-1] == "--no-fine" and "--resume" not in command
    assert all(flag in command for flag in ex.EAR_RECIPE)
    written = json.loads((tmp_path / "c" / "model_config.json").read_text())
    assert written == TINY_BASE
    dit_command = ex.train_command(ex.CELLS_BY_NAME["dit"], 1, args, tmp_path / "d" / "train")
    assert dit_command[0] == "train-dit" and "--model-config" not in dit_command
    (tmp_path / "d" / "train" / "checkpoints" / "checkpoint-00000001").mkdir(parents=True)
    assert ex.train_command(ex.CELLS_BY_NAME["dit"], 1, args, tmp_path / "d" / "train")[-2:] == [
        "--sample-steps",
        str(ex.EVAL_STEPS),
    ] and "--resume" in ex.train_command(ex.CELLS_BY_NAME["dit"], 1, args, tmp_path / "d" / "train")


# ------------------------------------------------------------------------------ MAR's head in training


def test_a_diffusion_head_config_trains_mars_head_with_its_own_loss(workspace):
    info = json.loads((workspace / "latents" / "cache_info.json").read_text())
    flags = argparse.Namespace(parscale_n=None, no_coarse=False, no_fine=False, latents="x")
    config = {**TINY_BASE, "diffusion_head": {"width": 8, "depth": 1}}
    with pytest.raises(ValueError, match="one token head"):
        generator.build_components(config, info, flags)
    del config["energy_head"]
    torch.manual_seed(0)
    parts = generator.build_components(config, info, flags)
    assert isinstance(parts[2], DiffusionHead) and parts[2].config.condition_dim == 16
    model = EARTrainingModel(*parts, diffusion_batch_mul=3)
    latents, labels = torch.randn(4, 4, 4, 4), torch.tensor([0, 1, 2, 3])
    calls = []
    original = DiffusionHead.loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            DiffusionHead, "loss", lambda self, z, t, **kw: calls.append((z.shape, kw)) or original(self, z, t, **kw)
        )
        loss = model(latents, labels, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and calls[0][1]["num_samples"] == 3 and calls[0][0][1] == 16
    loss.backward()
    # MAR's init zeros the head's output layer, so its first gradient reaches that layer (not yet input_proj).
    assert parts[2].out.weight.grad.abs().sum() > 0 and parts[1].blocks[0].attn.qkv.weight.grad is not None
    assert isinstance(generator.build_components(TINY_BASE, info, flags)[2], EnergyHead)


# ------------------------------------------------------------------------------ the driver


def test_every_run_is_complete_with_provenance_and_its_scores(workspace, grid):
    assert {k for k, v in grid.items() if v.startswith("done")} == {
        "lh_off/seed0", "lh_off/seed1", "diffusion_head/seed0", "dit/seed0"}  # fmt: skip
    for cell, seed in (("lh_off", 0), ("lh_off", 1), ("diffusion_head", 0), ("dit", 0)):
        r = record(workspace, cell, seed)
        assert r["complete"] and r["seed"] == seed and r["provenance"]["git_revision"]
        assert r["train"]["steps"] == 2 and "--seed " + str(seed) in r["train"]["command"]
        assert "--resume" not in r["train"]["command"]  # the command of a fresh start, though checkpoints exist
        steps = {"2", "1"} if cell != "lh_off" else {"2"}
        assert set(r["points"]) == steps and set(r["flops_per_image"]) == steps
        for point in r["points"].values():
            assert point["sampling_seed"] == seed + ex.SAMPLING_SEED_OFFSET
            m = point["metrics"]
            assert np.isfinite(m["demo_fid"]) and 0 <= m["class_accuracy"] <= 1 and point["seconds_per_image"] > 0
            assert point["samples"]["total"] == 10
            # The digit scores of the PNGs are those of the driver's in-memory samples (here its extractor is the
            # digit classifier too): the PNGs are the evaluated images, not a second sampling.
            driver = json.loads(open(point["eval_results"]).read())["metrics"]
            assert m["demo_fid"] == pytest.approx(driver["demo_fid"], rel=1e-4, abs=1e-6)
        assert r["parameters"] > 0 and all(f > 0 for f in r["flops_per_image"].values())
    assert record(workspace, "dit", 0)["points"]["2"]["guidance_scale"] == ex.DIT_GUIDANCE
    pipe = ParScaleEARPipeline.from_pretrained(workspace / "runs" / "diffusion_head" / "seed0" / "train" / "pipeline")
    assert isinstance(pipe.energy_head, DiffusionHead)


def test_seeds_change_the_training_and_the_samples(workspace, grid):
    a = ParScaleEARPipeline.from_pretrained(workspace / "runs" / "lh_off" / "seed0" / "train" / "pipeline")
    b = ParScaleEARPipeline.from_pretrained(workspace / "runs" / "lh_off" / "seed1" / "train" / "pipeline")
    assert not torch.equal(a.transformer.blocks[0].attn.qkv.weight, b.transformer.blocks[0].attn.qkv.weight)
    r0, r1 = record(workspace, "lh_off", 0), record(workspace, "lh_off", 1)
    assert r0["points"]["2"]["metrics"] != r1["points"]["2"]["metrics"]


def test_finished_runs_are_skipped_and_a_lost_point_is_scored_again_without_retraining(workspace, grid):
    args = grid_args(workspace, "--cells", "lh_off", "--seeds", "0", "1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "EVAL_STEPS", 2)
        assert ex.run_grid(args) == {
            "lh_off/seed0": "complete earlier, skipped",
            "lh_off/seed1": "complete earlier, skipped",
        }
        path = workspace / "results" / "experiments" / "lh_off" / "seed1.json"
        kept = json.loads(path.read_text())
        interrupted = {**kept, "complete": False, "points": {}}
        path.write_text(json.dumps(interrupted))
        pipeline = workspace / "runs" / "lh_off" / "seed1" / "train" / "pipeline" / "model_index.json"
        mtime = pipeline.stat().st_mtime_ns
        ran = []
        mp.setattr(ex, "run_command", lambda argv, log: ran.append(argv[0]) or in_process(argv, log))
        assert ex.run_grid(args)["lh_off/seed1"].startswith("done")
    assert ran == ["eval"] and pipeline.stat().st_mtime_ns == mtime
    again = json.loads(path.read_text())
    assert again["complete"] and again["points"]["2"]["metrics"] == kept["points"]["2"]["metrics"]
    assert again["train"] == kept["train"]


@pytest.mark.parametrize("same_loss", [True, False])
def test_a_run_whose_work_folder_is_gone_is_trained_again_and_checked_against_its_record(
    workspace, grid, tmp_path, same_loss
):
    """A new sitting on a fresh clone has the results files but not the runs' folders: an unscored run trains
    again; its points are kept only when the new training reproduces the recorded final loss."""
    kept = record(workspace, "lh_off", 1)
    recorded = {key: value for key, value in kept.items() if key not in ("parameters", "flops_per_image")}
    recorded["complete"] = False  # killed after its point was scored, before its parameters were counted
    if not same_loss:
        recorded["train"] = {**kept["train"], "final_loss": kept["train"]["final_loss"] + 1e-3}
    path = tmp_path / "r" / "experiments" / "lh_off" / "seed1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(recorded))
    args = grid_args(workspace, "--cells", "lh_off", "--seeds", "1", "--work-dir", str(tmp_path / "w"),
                     "--results-dir", str(path.parent.parent))  # fmt: skip
    ran = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "EVAL_STEPS", 2)
        mp.setattr(ex, "run_command", lambda argv, log: ran.append(argv[0]) or in_process(argv, log))
        assert ex.run_grid(args)["lh_off/seed1"].startswith("done")
    again = json.loads(path.read_text())
    note = again["train"].pop("retrained")
    assert note["reproduced"] is same_loss and note["lost_final_loss"] == recorded["train"]["final_loss"]
    assert again["complete"] and again["train"]["final_loss"] == kept["train"]["final_loss"]
    assert again["parameters"] == kept["parameters"] and again["flops_per_image"] == kept["flops_per_image"]
    # The point scored from the lost weights is kept only when the training reproduced, else scored again; seeded
    # CPU training is deterministic on one machine, so the retrained weights give the first run's samples.
    assert ran == (["train"] if same_loss else ["train", "eval"])
    assert again["points"]["2"]["metrics"] == kept["points"]["2"]["metrics"]


def test_a_run_written_with_other_settings_is_refused(workspace, grid):
    args = grid_args(workspace, "--cells", "lh_off", "--seeds", "0", "--images-per-class", "2")
    path = workspace / "results" / "experiments" / "lh_off" / "seed0.json"
    r = json.loads(path.read_text())
    path.write_text(json.dumps({**r, "complete": False}))
    try:
        with pytest.raises(ValueError, match="other grid settings"):
            ex.run_grid(args)
    finally:
        path.write_text(json.dumps(r))


def test_a_training_failure_names_the_command_and_its_log(workspace, tmp_path):
    args = grid_args(workspace, "--cells", "lh_off", "--seeds", "5", "--work-dir", str(tmp_path / "w"),
                     "--results-dir", str(tmp_path / "r" / "experiments"),
                     "--base-config", str(tmp_path / "bad.json"))  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps({**TINY_BASE, "transformer": {"hidden_size": 15, "num_heads": 2}}))
    with pytest.raises(RuntimeError, match=r"parscale-ear train.* failed .*log\.txt"):
        ex.run_grid(args)
    assert not (tmp_path / "w" / "lh_off" / "seed5.lock").exists()  # released


def test_missing_inputs_fail_before_any_work(workspace, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no latent cache"):
        ex.run(grid_args(workspace, "--latents", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="holds no DigitClassifier"):
        ex.run(grid_args(workspace, "--classifier", str(tmp_path)))
    with pytest.raises(ValueError, match="--steps"):
        ex.run(grid_args(workspace, "--steps", "0"))


def test_a_run_lock_keeps_a_second_driver_out_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    first, second = ex.RunLock(tmp_path / "a.lock"), ex.RunLock(tmp_path / "a.lock")
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "a.lock").write_text(str(dead.pid))
    assert first.acquire() and (tmp_path / "a.lock").read_text() == str(os.getpid())
    first.release()


def test_the_length_pilot_scores_every_checkpoint_from_its_ema_weights(workspace, tmp_path):
    args = grid_args(workspace, "--length-curve", "--pilot-steps", "4", "--pilot-every", "2",
                     "--work-dir", str(tmp_path / "w"),
                     "--results-dir", str(tmp_path / "r" / "experiments"))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "EVAL_STEPS", 2)
        mp.setattr(ex, "run_command", in_process)
        result = ex.run(args)
    assert set(result["points"]) == {"2", "4"} and [s for s, _ in result["loss"]][-1] == 4
    train = tmp_path / "w" / "length" / "train"
    final = ParScaleEARPipeline.from_pretrained(train / "pipeline")
    last = ex.pipeline_from_checkpoint(train, sorted((train / "checkpoints").iterdir())[-1])
    for name in ("lite_hybrid", "transformer", "energy_head"):
        a, b = getattr(final, name).state_dict(), getattr(last, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    first = ex.pipeline_from_checkpoint(train, sorted((train / "checkpoints").iterdir())[0])
    assert not torch.equal(first.transformer.blocks[0].attn.qkv.weight, last.transformer.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------ the report


def fake_run(cell, seed, fid, seconds=0.1, steps=(16,)):
    return {"cell": cell, "seed": seed, "complete": True, "parameters": 1000, "settings": {},
            "flops_per_image": {str(s): 2e9 for s in steps},
            "points": {str(s): {"metrics": {"fid": fid + s / 100, "demo_fid": fid / 10},
                                "seconds_per_image": seconds * s} for s in steps},
            "provenance": {"git_revision": "abc", "machine": {"cpu": "cpu", "cpu_count": 2}}}  # fmt: skip


def test_mean_and_spread_and_which_differences_exceed_it():
    assert ex.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert ex.mean_std([4.0])[1] is None
    assert ex.differs((10.0, 1.0, 3), (13.0, 1.0, 3)) is True
    assert ex.differs((10.0, 1.0, 3), (11.5, 1.0, 3)) is False
    assert ex.differs((10.0, None, 1), (20.0, 1.0, 3)) is None
    grid = {"lh_both": [fake_run("lh_both", s, f) for s, f in enumerate((10.0, 11.0, 12.0))],
            "lh_off": [fake_run("lh_off", s, f) for s, f in enumerate((20.0, 21.0, 22.0))],
            "lh_fine": [fake_run("lh_fine", s, f) for s, f in enumerate((10.5, 11.5, 12.5))],
            "p4": [fake_run("p4", 0, 5.0)]}  # fmt: skip
    assert ex.verdict(grid, "fid", "lh_both", "lh_off", "15% better")["verdict"] == "supported"
    assert ex.verdict(grid, "fid", "lh_both", "lh_off", "lh_both not worse")["verdict"].startswith("supported")
    assert ex.verdict(grid, "fid", "lh_off", "lh_both", "lh_off not worse")["verdict"].startswith("not supported")
    assert ex.verdict(grid, "fid", "lh_both", "lh_fine", "lh_both better")["verdict"].startswith("within the seed")
    assert ex.verdict(grid, "fid", "p4", "lh_both", "p4 better")["verdict"].startswith("one seed only")
    assert ex.verdict(grid, "fid", "p2", "lh_both", "p2 better")["verdict"] == "not measured yet"
    grid["diffusion_head"] = [fake_run("diffusion_head", s, 10.0, seconds=0.5 + s / 100) for s in range(3)]
    faster = ex.verdict(grid, "seconds_per_image", "lh_both", "diffusion_head", "lh_both better")
    assert faster["verdict"] == "supported" and faster["change"] == pytest.approx(0.1 / 0.51 - 1)
    row = next(line for line in ex.claims_table(grid) if "samples faster" in line)
    assert "| s / image | `lh_both` | `diffusion_head` | 1.6000 ± 0.0000 | 8.1600 ± 0.1600 |" in row


def test_the_report_is_generated_from_the_files_with_spread_and_plots(tmp_path):
    root = tmp_path / "results"
    for cell, fids in (("lh_both", (10.0, 12.0)), ("lh_off", (20.0, 21.0)), ("dit", (8.0,))):
        for seed, fid in enumerate(fids):
            path = root / "experiments" / cell / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fake_run(cell, seed, fid, steps=(8, 16, 32))))
    retrained = {"reproduced": False, "lost_final_loss": 1.2, "lost_git_revision": "0123456789abcdef"}
    timed = {**fake_run("lh_off", 2, 22.0), "train": {"seconds": 5400.0, "final_loss": 1.3, "retrained": retrained}}
    timed["points"]["16"]["timing"] = {"sampling_seconds": 1800.0}
    (root / "experiments" / "lh_off" / "seed2.json").write_text(json.dumps(timed))
    partial = {**fake_run("p2", 0, 1.0), "complete": False}
    (root / "experiments" / "p2").mkdir()
    (root / "experiments" / "p2" / "seed0.json").write_text(json.dumps(partial))
    text = ex.write_report(root)
    assert (root / "experiments.png").stat().st_size > 0 and "![the grid's plots](experiments.png)" in text
    assert "6 of 33 runs complete (11 cells x 3 seeds)" in text
    assert "Compute of this 1 run: 1.5 h of training and 0.5 h of sampling" in text  # only runs that record it
    assert "`lh_off` seed 2 (1.30000 against 1.20000 at 0123456789ab)" in text
    reproduced = {**timed, "train": {**timed["train"], "retrained": {**retrained, "reproduced": True}}}
    assert ex.retrained_line({"lh_off": [reproduced]}) is None  # a run that reproduced is not named
    both = next(line for line in text.splitlines() if "`lh_both`) |" in line)
    assert "| 2 | 11.2 ± 1.4 |" in both  # mean and sample std of 10.16 and 12.16
    assert both.endswith("| 2.00 | 1,000 |")  # GFLOPs and parameters: fixed by the architecture, no "± 0"
    grown = {"lh_both": [fake_run("lh_both", 0, 10.0), {**fake_run("lh_both", 1, 10.0), "parameters": 1100}]}
    assert ex.main_table(grown)[2].endswith("| 2.00 | 1,050 ± 71 |")  # seeds that disagree keep their spread
    assert "| 1 | 8.2 |" in next(line for line in text.splitlines() if "`dit`) |" in line)  # one seed: no ±
    assert "| 0 | –" in next(line for line in text.splitlines() if "`p2`) |" in line)  # partial runs left out
    a1 = next(line for line in text.splitlines() if line.startswith("| A1"))
    assert "| -47.3% | yes |" in a1 and "supported" in a1
    assert a1.endswith("| -47.6% (yes) |")  # demo-FID: 1.1 against 2.1
    assert ex.readme_section(root).count("results/experiments.png") == 1
    assert "No run of the grid" in ex.readme_section(tmp_path / "empty")


def test_a_model_card_carries_its_cells_scores_over_seeds(tmp_path):
    from parscale_ear_hf.model_card import build_model_card
    from research.evidence_grid.model_card_grid import cell_card_section

    from conftest import tiny_pipeline

    root = tmp_path / "results"
    for cell, fids in (("lh_both", (10.0, 12.0, 11.0)), ("lh_off", (20.0, 21.0, 22.0))):
        for seed, fid in enumerate(fids):
            path = root / "experiments" / cell / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            settings = {"training_steps": 600, "base_config": str(tmp_path / "base.json")}
            path.write_text(json.dumps({**fake_run(cell, seed, fid), "settings": settings}))
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    base = {name: {k: v for k, v in getattr(pipe, name).config.items() if not k.startswith("_")}
            for name in ("lite_hybrid", "transformer", "energy_head")}  # fmt: skip
    deeper = {**base["transformer"], "num_layers": 5}
    (tmp_path / "base.json").write_text(json.dumps({**base, "transformer": deeper}))
    card = str(build_model_card(tmp_path / "pipe", [], grid_section=cell_card_section(root, "lh_both", pipe)))
    section = card[card.index("### This configuration over seeds") :]
    assert "The grid's cell `lh_both` trained" in section and "for 600 steps" in section and "over 3 seeds" in section
    tiny_layers = pipe.transformer.config.num_layers
    assert f"- transformer.num_layers: {tiny_layers} here, 5 in the grid's runs" in section
    assert section.count("in the grid's runs") == 1  # the other fields agree, so are not listed
    (tmp_path / "base.json").write_text(json.dumps(base))
    same = str(build_model_card(tmp_path / "pipe", [], grid_section=cell_card_section(root, "lh_both", pipe)))
    assert "The same configuration trained" in same and "in the grid's runs" not in same
    assert "| 3 | 11.2 ± 1.0 |" in section and "`lh_off`) |" not in section  # its own row only
    assert "| A1: LiteHybrid costs no quality |" in section
    assert "over seeds" not in str(build_model_card(tmp_path / "pipe", []))
    with pytest.raises(ValueError, match="unknown cell 'nope'"):
        cell_card_section(root, "nope", pipe)
    with pytest.raises(FileNotFoundError, match="holds no complete run"):
        cell_card_section(root, "p4", pipe)


def test_exact_architecture_is_the_classes_defaults():
    """What the control cell and the shipped model train with is what a new EARTransformer / EnergyHead gets."""
    classes = {"transformer": EARTransformer, "energy_head": EnergyHead}
    for section, fields in ex.EXACT_ARCHITECTURE.items():
        defaults = inspect.signature(classes[section].__init__).parameters
        assert {k: defaults[k].default for k in fields} == fields


def test_the_best_cell_is_the_lowest_mean_fid_among_complete_energy_head_cells():
    fids = {"lh_off": 30, "lh_coarse": 25, "lh_fine": 26, "lh_both": 20, "lh_both_exact": 21, "p2": 19.5, "p4": 22,
            "p1_wide": 40, "p1_deep": 41}  # fmt: skip
    grid = {n: [fake_run(n, s, f + s) for s in range(3)] for n, f in fids.items()}
    grid["dit"] = [fake_run("dit", s, 1.0) for s in range(3)]  # not a candidate: not our method
    best = ex.best_cell(grid)
    assert best["cell"] == "p2" and best["runner_up"] == "lh_both" and best["lead_exceeds_spread"] is False
    assert list(best["fid"])[:2] == ["p2", "lh_both"] and best["fid"]["p2"]["std"] == pytest.approx(1.0)
    del grid["p1_deep"][2]
    with pytest.raises(ValueError, match=r"not complete: p1_deep \(2 of 3 seeds\)"):
        ex.best_cell(grid)


def test_ship_trains_the_cell_and_saves_it_as_the_demo_model_keeping_its_card(workspace, tmp_path):
    target = tmp_path / "models" / "demo"
    target.mkdir(parents=True)
    (target / "README.md").write_text("the old card")
    args = grid_args(workspace, "--ship", "--ship-cell", "lh_fine", "--ship-steps", "2", "--ship-to", str(target),
                     "--work-dir", str(tmp_path / "w"),
                     "--results-dir", str(tmp_path / "r" / "experiments"))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "run_command", in_process)
        record = ex.run(args)
    pipe = ParScaleEARPipeline.from_pretrained(target)
    assert pipe.lite_hybrid.config.use_coarse is False and pipe.lite_hybrid.config.use_fine is True
    assert pipe.transformer.config.mlp_activation == "gelu" and pipe.energy_head.config.block_norm_affine
    assert not pipe.energy_head.config.temperature_scales_final_layer  # EAR's architecture, not the demo pins
    assert (target / "README.md").read_text() == "the old card"
    shipped_args = json.loads((target / "training" / "run_config.json").read_text())["args"]
    assert shipped_args["max_steps"] == 2 and shipped_args["checkpoint_every"] == 1  # the grid's --checkpoint-every
    assert record["cell"] == "lh_fine" and record["chosen_by"] == "--ship-cell" and "--no-coarse" in record["command"]
    assert (tmp_path / "r" / "experiments_ship.json").is_file()
    with pytest.raises(ValueError, match="the grid is not complete"):
        ex.run(grid_args(workspace, "--ship", "--results-dir", str(tmp_path / "r" / "experiments")))


def test_a_cells_seconds_never_mix_timings_alone_with_the_evaluations():
    quiet = {"seconds_per_image": 0.5, "repeats": 3, "batch": 100, "threads": 2, "machine": {"cpu": "cpu"}}
    timed = fake_run("lh_off", 1, 10.0, seconds=0.4)
    timed["points"]["16"]["quiet_timing"] = quiet
    runs = [fake_run("lh_off", 0, 10.0, seconds=0.4), timed]
    assert ex.figure(runs, 16, "seconds_per_image") == (0.5, None, 1)  # not the evaluation's 6.4 of seed 0
    assert ex.figure(runs[:1], 16, "seconds_per_image") == (pytest.approx(6.4), None, 1)  # none alone: evaluation
    note = ex.timing_note({"lh_off": runs})
    assert note.startswith("1 of 2 points timed alone by `--retime` (median of 3 calls of a batch of 100, 2 thread")
    assert note.endswith("`--retime` has not reached them yet): `lh_off` seed 0")


def test_retime_times_every_point_alone_once_and_the_report_says_so(workspace, grid, capsys):
    args = grid_args(workspace, "--retime", "--retime-repeats", "1")
    kept = workspace / "runs" / "lh_off" / "seed1" / "train" / "pipeline"
    kept.rename(kept.with_name("elsewhere"))  # a run whose pipeline was not kept is skipped, saying so
    run_provenance = record(workspace, "dit", 0)["provenance"]
    done = ex.run(args)
    assert "lh_off/seed1: no saved pipeline at" in capsys.readouterr().out
    kept.with_name("elsewhere").rename(kept)
    assert set(done) == {"lh_off/seed0/s2", "diffusion_head/seed0/s2", "diffusion_head/seed0/s1", "dit/seed0/s2",
                         "dit/seed0/s1"}  # fmt: skip
    assert set(ex.run(args)) == {"lh_off/seed1/s2"}  # there again: timed
    r = record(workspace, "dit", 0)
    quiet = r["points"]["1"]["quiet_timing"]
    assert quiet["batch"] == 5 and quiet["repeats"] == 1 and quiet["seconds_per_image"] > 0
    assert r["complete"] and r["points"]["1"]["seconds_per_image"] > 0  # the evaluation's timing is kept
    # Its two points retimed, one write each: the run's provenance is kept beside the retime's.
    assert r["run_provenance"] == run_provenance
    assert ex.run(args) == {}  # timed once
    assert ex.figure([r], 1, "seconds_per_image")[0] == quiet["seconds_per_image"]
    assert "every point timed alone by `--retime` (median of 1 calls of a batch of 5" in ex.timing_note(
        ex.load_grid(workspace / "results" / "experiments")
    )


def test_runs_use_the_drivers_code_not_a_package_in_the_working_directory(tmp_path, monkeypatch):
    """A driver started in another checkout's folder trains with its own code (the revision it records)."""
    impostor = tmp_path / "parscale_ear_hf"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    (impostor / "cli.py").write_text("print('the impostor ran')\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "log.txt"
    ex.run_command(["info", "--help"], log)
    text = log.read_text()
    assert "impostor" not in text and "--model" in text


def test_the_package_root_leads_pythonpath_once_and_the_rest_is_kept():
    import parscale_ear_hf
    from parscale_ear_hf.commands import cli_process

    root = str(Path(parscale_ear_hf.__file__).resolve().parents[1])
    argv, env = cli_process("info", env={"PYTHONPATH": os.pathsep.join(["/elsewhere", root])})
    assert argv[1:] == ["-P", "-m", "parscale_ear_hf.cli", "info"]
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]

"""`parscale_ear_hf.training.checkpointing`: the pickle-free format restores training exactly, refuses the rest;
interim (time-based) checkpoints and the default interval."""

import argparse
import json
import pickle
import re
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler

from parscale_ear_hf.training import checkpointing, dit, generator, recipe
from parscale_ear_hf.training import vae as vae_training
from parscale_ear_hf.training.checkpointing import (
    FORMAT,
    STATE_FILE,
    CheckpointTimer,
    check_supported,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    resolve_resume,
    save_checkpoint,
    write_json_atomic,
)

PARTS_FILES = [
    "ema.json",
    "ema.safetensors",
    "model.safetensors",
    "optimizer.json",
    "optimizer.safetensors",
    "scheduler.json",
    STATE_FILE,
]


def training_parts(seed: int, width: int = 8, ema_warmup: bool = True) -> dict:
    """A small model with AdamW (two named groups, betas as a tuple), a warm-up scheduler and an EMA
    (diffusers' with its warm-up, or EAR's constant rate)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 2))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"name": "decay", "params": decay}, {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=4)
    ema = recipe.make_ema(model.parameters(), 0.9, warmup=ema_warmup)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema}


def train(parts: dict, steps: range) -> None:
    """Updates whose data are a function of the step, as in the training scripts."""
    for step in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        parts["model"](x).pow(2).mean().backward()
        parts["optimizer"].step()
        parts["optimizer"].zero_grad(set_to_none=True)
        parts["scheduler"].step()
        parts["ema"].step(parts["model"].parameters())


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture
def checkpoint(accelerator, tmp_path):
    parts = training_parts(seed=0)
    train(parts, range(3))
    return save_checkpoint(accelerator, tmp_path / "checkpoints", 3, {"note": "hi"}, **parts)


@pytest.mark.parametrize("ema_warmup", [True, False])
def test_resume_continues_exactly_and_reads_no_pickle(accelerator, tmp_path, monkeypatch, ema_warmup):
    straight = training_parts(seed=0, ema_warmup=ema_warmup)
    train(straight, range(3))
    path = save_checkpoint(accelerator, tmp_path / "checkpoints", 3, {"note": "hi"}, **straight)
    train(straight, range(3, 6))

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, forbidden)
    # Other initial weights: all of them must come from the checkpoint.
    resumed = training_parts(seed=1, ema_warmup=ema_warmup)
    assert load_checkpoint(accelerator, path, **resumed) == {"note": "hi", "step": 3}
    monkeypatch.undo()
    assert isinstance(resumed["optimizer"].param_groups[0]["betas"], tuple)
    train(resumed, range(3, 6))

    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight["ema"].shadow_params, resumed["ema"].shadow_params):
        assert torch.equal(a, b)
    assert resumed["ema"].optimization_step == straight["ema"].optimization_step == 6
    assert resumed["scheduler"].state_dict() == straight["scheduler"].state_dict()
    saved, loaded = straight["optimizer"].state_dict(), resumed["optimizer"].state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, values in saved["state"].items():
        assert all(torch.equal(v, loaded["state"][index][k]) for k, v in values.items())


def test_a_checkpoint_is_only_safetensors_and_json(checkpoint):
    assert sorted(p.name for p in checkpoint.iterdir()) == PARTS_FILES
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["format"] == FORMAT and state["step"] == 3 and sorted(state["files"]) == PARTS_FILES[:-1]
    assert not list(checkpoint.parent.glob(".tmp-*"))


def test_a_checkpoint_of_accelerate_save_state_is_refused(accelerator, tmp_path):
    parts = training_parts(seed=0)
    model, optimizer = accelerator.prepare(parts["model"], parts["optimizer"])
    old = tmp_path / "checkpoints" / "checkpoint-00000003"
    accelerator.save_state(str(old))
    (old / STATE_FILE).write_text('{"step": 3}')  # what this project wrote before its own format
    assert list(old.glob("*.pkl")) and list(old.glob("*.bin"))
    expected = rf"checkpoint '{re.escape(str(old))}' was not written by .*\"format\": '{FORMAT}'"
    with pytest.raises(ValueError, match=expected):
        resolve_resume("latest", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="not written by parscale_ear_hf.training.checkpointing"):
        load_checkpoint(accelerator, old, model=model, optimizer=optimizer)


def test_a_missing_or_unknown_file_is_refused(checkpoint):
    (checkpoint / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match=r"it lacks \['optimizer.safetensors'\]"):
        resolve_resume(str(checkpoint), checkpoint.parent)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "files": ["model.safetensors", "optimizer.pt"]}))
    with pytest.raises(ValueError, match=r"lists the files \['model.safetensors', 'optimizer.pt'\]"):
        resolve_resume("latest", checkpoint.parent)


def test_parts_that_do_not_fit_the_run_are_refused(accelerator, checkpoint):
    without_ema = training_parts(seed=0)
    del without_ema["ema"]
    with pytest.raises(ValueError, match=r"holds \[.*'ema.json'.*\], but this run restores \['model.safetensors'"):
        load_checkpoint(accelerator, checkpoint, **without_ema)
    with pytest.raises(ValueError, match="model.safetensors does not fit the model being trained"):
        load_checkpoint(accelerator, checkpoint, **training_parts(seed=0, width=16))
    regrouped = training_parts(seed=0)
    groups = regrouped["optimizer"].param_groups
    groups[0]["name"], groups[1]["name"] = groups[1]["name"], groups[0]["name"]
    expected = r"parameter groups \[\('decay', 2\), \('no_decay', 4\)\] .* this run's has \[\('no_decay', 2\)"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(accelerator, checkpoint, **regrouped)


def test_sharded_distributed_types_are_refused():
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(NotImplementedError, match=f"distributed type {kind} shards"):
            check_supported(types.SimpleNamespace(distributed_type=kind))


def test_write_json_atomic_leaves_the_old_file_when_the_object_is_not_json(tmp_path):
    path = tmp_path / "run_config.json"
    write_json_atomic(path, {"lr": 1e-3})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, {"lr": 2e-3, "func": print})
    assert json.loads(path.read_text()) == {"lr": 1e-3}
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.json"]


def test_an_interim_checkpoint_is_not_kept_and_the_next_save_replaces_it(accelerator, tmp_path):
    parts, root = training_parts(seed=0), tmp_path / "checkpoints"

    def save(step, interim):
        save_checkpoint(accelerator, root, step, {}, **parts, keep=2, interim=interim)
        return {int(p.name.split("-")[1]): read_checkpoint_state(p)["interim"] for p in list_checkpoints(root)}

    assert save(1, interim=False) == {1: False}
    assert save(2, interim=True) == {1: False, 2: True}
    assert save(3, interim=True) == {1: False, 3: True}  # the next save replaces it
    assert save(4, interim=False) == {1: False, 4: False}
    assert save(5, interim=True) == {1: False, 4: False, 5: True}  # not counted against keep=2
    assert resolve_resume("latest", root).name == "checkpoint-00000005"
    assert load_checkpoint(accelerator, root / "checkpoint-00000005", **training_parts(seed=1)) == {"step": 5}
    assert save(6, interim=False) == {4: False, 6: False}


def test_the_timer_is_due_when_its_minutes_have_passed_since_the_last_save(accelerator, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(checkpointing, "monotonic", lambda: now[0])
    timer, never = CheckpointTimer(accelerator, 5), CheckpointTimer(accelerator, 0)
    now[0] = 1299.0
    assert not timer.due()
    now[0] = 1300.0
    assert timer.due() and timer.due()  # until a save
    timer.saved()
    now[0] = 1599.0
    assert not timer.due()
    now[0] = 10_000.0
    assert timer.due() and not never.due()


@pytest.mark.parametrize(
    "module, required",
    [
        (generator, ["--latents", "l", "--model-config", "m", "--max-steps", "1"]),
        (dit, ["--latents", "l", "--max-steps", "1"]),
        (vae_training, ["--dataset", "d"]),
    ],
)
def test_every_trainer_saves_at_least_every_5_minutes_by_default(module, required):
    args = module.add_arguments(argparse.ArgumentParser()).parse_args([*required, "--output-dir", "o"])
    assert args.checkpoint_minutes == checkpointing.CHECKPOINT_MINUTES == 5.0
    assert args.checkpoint_every == 500 and args.keep_checkpoints == 2

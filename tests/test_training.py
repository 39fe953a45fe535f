"""Generator training: EAR's recipe (lr from blr, schedule, param groups, EMA, resuming with new flags), exact
resume after SIGKILL and from an interim checkpoint, atomic checkpoints, a fresh start keeps an earlier run's log,
a moved latent cache, two processes, bad input."""

import argparse
import itertools
import json
import math
import os
import pickle
import shutil
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

from parscale_ear_hf import EARTrainingModel, EARTransformer, EnergyHead, LiteHybrid, LiteVAE, cli
from parscale_ear_hf.saving import weights_fingerprint
from parscale_ear_hf.training import checkpointing, latent_cache, recipe
from parscale_ear_hf.training.checkpointing import (
    FORMAT,
    JsonlLog,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint_state,
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
        "--score-batch-mul",
        "1",
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


def test_a_fresh_start_moves_an_earlier_runs_log_and_record_aside(workspace, tmp_path, capsys):
    """A run killed before its first checkpoint leaves nothing to resume; starting it again keeps its log."""
    out = tmp_path / "out"
    (out / "earlier-runs" / "1").mkdir(parents=True)  # set aside by an earlier fresh start
    log, record = b'{"step": 1, "loss": 3.5}\n{"step": 2, "lo', b'{"args": {"max_steps": 4000}}'
    (out / "train_log.jsonl").write_bytes(log)
    (out / "run_config.json").write_bytes(record)
    run(parse(train_args(workspace, out, "--max-steps", "2")))
    moved = out / "earlier-runs" / "2"
    assert (moved / "train_log.jsonl").read_bytes() == log and (moved / "run_config.json").read_bytes() == record
    assert sorted(losses(out)) == [1, 2]
    assert json.loads((out / "run_config.json").read_text())["args"]["max_steps"] == 2
    assert f"moved its train_log.jsonl, run_config.json to '{moved}'" in capsys.readouterr().out


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("precision", ["no", "bf16"])  # bf16: CPU autocast, bit-exact on resume as well
def test_an_interim_checkpoint_saved_by_the_clock_resumes_exactly(workspace, tmp_path, monkeypatch, precision):
    flags = ["--max-steps", "6", "--checkpoint-every", "3", "--mixed-precision", precision]
    # EAR's zero-initialised head makes the first losses the same in bf16: check the autocast of every forward.
    autocast, forward = [], EARTrainingModel.forward

    def spy(self, *args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(EARTrainingModel, "forward", spy)
    reference = tmp_path / "reference"
    run(parse(train_args(workspace, reference, *flags, "--checkpoint-minutes", "0")))
    assert set(autocast) == {precision == "bf16" and torch.bfloat16}

    monkeypatch.setattr(checkpointing, "monotonic", itertools.count(0.0, 60.0).__next__)  # a minute per reading
    write = JsonlLog.write

    def interrupt_at_step_5(self, record):  # after step 5's update, before its checkpoint
        if record["step"] == 5:
            raise KeyboardInterrupt
        write(self, record)

    monkeypatch.setattr(JsonlLog, "write", interrupt_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(parse(train_args(workspace, out, *flags, "--checkpoint-minutes", "1")))
    monkeypatch.setattr(JsonlLog, "write", write)
    # Interim checkpoints after steps 1, 2 and 4, each removed by the next save; the kept one at 3 stays.
    interim = {p.name: read_checkpoint_state(p)["interim"] for p in list_checkpoints(out / "checkpoints")}
    assert interim == {"checkpoint-00000003": False, "checkpoint-00000004": True}
    run(parse(train_args(workspace, out, *flags, "--checkpoint-minutes", "1", "--resume", "latest")))
    assert losses(out) == losses(reference)  # every step's loss, bit for bit
    for component in ("lite_hybrid", "transformer", "energy_head"):
        a = load_file(reference / "pipeline" / component / "diffusion_pytorch_model.safetensors")
        b = load_file(out / "pipeline" / component / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000003", "checkpoint-00000006"]


def test_a_moved_cache_trains_from_another_folder_with_its_copy_of_the_vae(workspace, tmp_path, monkeypatch):
    """cache-latents given a relative --vae; then the cache is moved, the VAE it was given deleted, and training
    runs from another working directory."""
    made = tmp_path / "made"
    shutil.copytree(workspace / "vae", made / "runs" / "vae" / "vae")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    names = datasets.ClassLabel(names=[f"c{i}" for i in range(10)])
    features = datasets.Features({"image": datasets.Image(), "label": names})
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 10 for i in range(8)]}, features=features)
    datasets.DatasetDict({"train": data}).save_to_disk(made / "data")
    monkeypatch.chdir(made)
    flags = ["--vae", "runs/vae/vae", "--dataset", "data", "--output-dir", "latents", "--image-size", "16",
             "--no-hflip"]  # fmt: skip
    info = latent_cache.run(latent_cache.add_arguments(argparse.ArgumentParser()).parse_args(flags))
    shutil.move(made / "latents", tmp_path / "scratch" / "latents")
    shutil.rmtree(made)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    argv = train_args(workspace, "out", "--max-steps", "2")
    argv[argv.index("--latents") + 1] = "../scratch/latents"
    run(parse(argv))
    saved = LiteVAE.from_pretrained(tmp_path / "elsewhere" / "out" / "pipeline" / "vae")
    original = LiteVAE.from_pretrained(workspace / "vae")
    assert weights_fingerprint(saved) == weights_fingerprint(original) == info["vae_weights_sha256"]
    torch.manual_seed(1)
    LiteVAE(**TINY_VAE_CONFIG).save_pretrained("other")
    with pytest.raises(ValueError, match=r"train: --vae 'other' is not the VAE .* weights sha256 [0-9a-f]{64} vs"):
        run(parse([*argv, "--output-dir", "refused", "--vae", "other"]))
    assert not Path("refused").exists()


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
    assert run_config["resolved"]["lr"] == 1e-4 * 4 / 256  # the default --blr 1e-4 at a batch of 4
    assert (out / "pipeline" / "model_index.json").is_file()


def test_grad_clip_zero_disables_clipping(workspace, tmp_path):
    models = [
        run(parse(train_args(workspace, tmp_path / name, "--max-steps", "2", "--grad-clip", clip)))
        for name, clip in (("off", "0"), ("huge", "1e9"))
    ]
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name


FLOAT_FLAGS = (
    "--checkpoint-minutes",
    "--lr",
    "--blr",
    "--min-lr",
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
        ("--score-batch-mul", "0"),
        ("--gradient-accumulation-steps", "0"),
        ("--warmup-steps", "-1"),
        ("--blr", "0"),
        ("--min-lr", "1"),  # above the lr (the default --blr 1e-4 at a batch of 4)
        ("--min-lr", "-1"),
        ("--grad-clip", "-1"),
        ("--head-lr-scale", "-0.25"),
        ("--energy-lambda", "-0.1"),
        ("--energy-lambda", "1.5"),
        ("--weight-decay", "-0.01"),
        ("--lr", "0"),
        ("--log-every", "0"),
        ("--checkpoint-minutes", "-1"),
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
    # The resumed run saves an interim checkpoint after step 4 (due at once): both processes must agree to.
    resumed = ["--max-steps", "5", "--resume", "latest", "--checkpoint-minutes", "1e-9"]
    for port, extra in (("29533", ["--max-steps", "3"]), ("29534", resumed)):
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
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000003", "checkpoint-00000005"]


def test_exclusive_flags_and_fp16_on_cpu_fail_before_anything_is_loaded(workspace, tmp_path, monkeypatch, capsys):
    for pair in (("--lr", "1e-3", "--blr", "1e-4"), ("--warmup-steps", "1", "--warmup-epochs", "1")):
        with pytest.raises(SystemExit):
            parse(train_args(workspace, tmp_path / "out", "--max-steps", "2", *pair))
        assert f"argument {pair[2]}: not allowed with argument {pair[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(train_args(workspace, tmp_path / "out", "--max-steps", "2", "--epochs", "1"))
    assert "argument --epochs: not allowed with argument --max-steps" in capsys.readouterr().err

    def no_vae(path):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("parscale_ear_hf.training.latent_cache.load_vae", no_vae)
    for extra, expected in (
        (("--adam-betas", "0.9", "1.0"), r"`--adam-betas` must be a finite number in \[0.0, 1.0\), got 1.0"),
        (("--epochs", "0"), r"`--epochs` must be an integer >= 1, got 0"),
        (("--epochs", "1", "--warmup-epochs", "-1"), r"`--warmup-epochs` must be an integer >= 0, got -1"),
        (("--mixed-precision", "fp16"), r"`--mixed-precision` must be one of \('no', 'bf16'\) on cpu, got 'fp16'"),
    ):
        argv = train_args(workspace, tmp_path / "out", *extra)
        if "--epochs" not in extra:
            argv += ["--max-steps", "2"]
        if "--warmup-epochs" in extra:
            del argv[argv.index("--warmup-steps") : argv.index("--warmup-steps") + 2]
        with pytest.raises(ValueError, match=expected):
            run(parse(argv))
    assert not (tmp_path / "out").exists()


def tiny_model() -> EARTrainingModel:
    """The training config's components (LiteHybrid with both branches, ParScale with 2 streams)."""
    config = TINY_MODEL_CONFIG
    return EARTrainingModel(
        LiteHybrid(in_channels=4, grid_size=4, **config["lite_hybrid"]),
        EARTransformer(in_channels=4, grid_size=4, num_classes=10, **config["transformer"]),
        EnergyHead(token_channels=4, condition_dim=32, **config["energy_head"]),
    )


def group_members(model, groups) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert sum(map(len, members.values())) == len(names)  # each parameter in exactly one group
    return members


def test_reference_param_groups_are_eas_add_weight_decay_scorelr():
    model = tiny_model()
    groups = recipe.param_groups(model, "reference", head_lr_scale=0.25, weight_decay=0.02)
    assert [(g["name"], g["lr_scale"], g["weight_decay"]) for g in groups] == [
        ("no_decay", 1.0, 0.0),
        ("decay", 1.0, 0.02),
        ("head", 0.25, 0.0),
    ]
    members = group_members(model, groups)
    named = dict(model.named_parameters())
    # EAR: no decay on 1-d parameters and biases, the head's included, at the full lr.
    assert members["no_decay"] == {n for n, p in named.items() if p.dim() == 1 or n.endswith(".bias")}
    assert {"energy_head.out.bias", "transformer.norm.weight", "lite_hybrid.coarse_gate"} <= members["no_decay"]
    # EAR: the head's other weights at lr x 0.25, not decayed.
    assert members["head"] == {n for n in named if n.startswith("energy_head.")} - members["no_decay"]
    assert {"energy_head.out.weight", "energy_head.noise_embed.weight"} <= members["head"]
    # EAR decays its embeddings, mask token, positions and z_proj; ours: the same roles, plus the ParScale
    # prefixes and aggregator and LiteHybrid.
    assert {
        "transformer.class_embedding.weight",
        "transformer.mask_token",
        "transformer.pos_embedding",
        "transformer.token_proj.weight",
        "transformer.stream_prefix",
        "transformer.stream_aggregator.0.weight",
        "transformer.blocks.0.attn.qkv.weight",
        "lite_hybrid.coarse_pos",
        "lite_hybrid.fine_local.weight",
    } <= members["decay"]
    assert not any(n.startswith("energy_head.") for n in members["decay"])


def test_parscale_v0_param_groups_are_the_shipped_demos():
    model = tiny_model()
    groups = recipe.param_groups(model, "parscale-v0", head_lr_scale=0.25, weight_decay=0.02)
    assert [(g["name"], g["lr_scale"], g["weight_decay"]) for g in groups] == [
        ("backbone_no_decay", 1.0, 0.0),
        ("backbone_decay", 1.0, 0.02),
        ("head_no_decay", 0.25, 0.0),
        ("head_decay", 0.25, 0.02),
    ]
    members = group_members(model, groups)
    assert {
        "transformer.class_embedding.weight",
        "transformer.mask_token",
        "transformer.stream_prefix",
        "transformer.token_proj.weight",  # "token" in the name
        "transformer.norm.weight",
    } <= members["backbone_no_decay"]
    assert {"lite_hybrid.coarse_pos", "transformer.stream_aggregator.0.weight"} <= members["backbone_decay"]
    assert "energy_head.out.bias" in members["head_no_decay"] and "energy_head.out.weight" in members["head_decay"]
    with pytest.raises(ValueError, match=r"`scheme` must be one of \('reference', 'parscale-v0'\), got 'ear'"):
        recipe.param_groups(model, "ear")


def ear_adjust_learning_rate(epoch, lr, warmup_epochs, epochs, schedule, min_lr):
    """EAR's util/lr_sched.py formula, written out for comparison."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if schedule == "constant":
        return lr
    return min_lr + (lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))
    )


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_from_blr_with_a_warm_up_in_epochs_follows_ear(schedule):
    flags = ["--epochs", "5", "--blr", "2e-3", "--warmup-epochs", "2", "--gradient-accumulation-steps", "2"]
    flags += ["--lr-schedule", schedule, "--min-lr", "1e-6"]
    args = parse(
        ["--latents", "unused", "--model-config", "unused", "--output-dir", "unused", "--batch-size", "4", *flags]
    )
    resolved = recipe.resolve(args, num_examples=50)  # 12 micro-batches of 4 per epoch, the last 2 examples dropped
    assert resolved.effective_batch_size == 8 and resolved.lr == pytest.approx(2e-3 * 8 / 256)
    assert resolved.steps_per_epoch == 6 and resolved.warmup_steps == 12 and resolved.max_steps == 30
    for step in range(30):
        expected = ear_adjust_learning_rate(step / 6, resolved.lr, 2, 5, schedule, 1e-6)
        assert resolved.lr_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    assert resolved.lr_at(0) == 0.0 and resolved.lr_at(12) == pytest.approx(resolved.lr)
    assert (resolved.lr_at(29) < resolved.lr / 10) == (schedule == "cosine")


def test_lr_at_step_warms_up_from_0_then_stays_or_follows_a_half_cosine_to_min_lr():
    cosine = dict(lr=1.0, warmup_steps=4, max_steps=12, schedule="cosine", min_lr=0.1)
    assert [recipe.lr_at_step(s, **cosine) for s in (0, 1, 2, 4)] == [0.0, 0.25, 0.5, 1.0]  # warm-up start, end
    assert recipe.lr_at_step(6, **cosine) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert recipe.lr_at_step(8, **cosine) == pytest.approx(0.55)  # mid-cosine: halfway between lr and min_lr
    assert recipe.lr_at_step(12, **cosine) == pytest.approx(0.1)  # the end
    lrs = [recipe.lr_at_step(s, **cosine) for s in range(13)]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    constant = {**cosine, "schedule": "constant"}
    assert [recipe.lr_at_step(s, **constant) for s in (0, 2, 4, 11, 12)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert recipe.lr_at_step(0, lr=0.1, warmup_steps=0, max_steps=6, schedule="cosine") == 0.1  # no warm-up
    with pytest.raises(ValueError, match=r"`schedule` must be one of \('constant', 'cosine'\), got 'linear'"):
        recipe.lr_at_step(5, **{**cosine, "schedule": "linear"})


def test_set_lr_scales_each_group():
    model = tiny_model()
    optimizer = torch.optim.AdamW(recipe.param_groups(model, "reference", head_lr_scale=0.25), lr=1.0)
    recipe.set_lr(optimizer, 4e-4)
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [
        ("no_decay", 4e-4),
        ("decay", 4e-4),
        ("head", 1e-4),
    ]


def test_ema_is_ears_constant_rate_from_a_copy_or_diffusers_warm_up():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    start = param.detach().clone()
    constant, warmup = recipe.make_ema([param], 0.9, warmup=False), recipe.make_ema([param], 0.9, warmup=True)
    expected = start.clone()  # engine_ear.py: ema_params = a copy of the parameters at the start
    for step in range(3):
        with torch.no_grad():
            param.add_(1.0 + step)
        constant.step([param])
        warmup.step([param])
        expected = 0.9 * expected + 0.1 * param.detach()  # engine_ear.update_ema, after every update
        assert torch.allclose(constant.shadow_params[0], expected, rtol=1e-6), step
    # diffusers' EMAModel copies the parameters at its first update and ramps its rate (1+t)/(10+t) up to 0.9.
    t1, t2 = (1 + 1) / (10 + 1), (1 + 2) / (10 + 2)
    values = [start + 1.0, start + 3.0, start + 6.0]
    ramp = t2 * (t1 * values[0] + (1 - t1) * values[1]) + (1 - t2) * values[2]
    assert torch.allclose(warmup.shadow_params[0], ramp, rtol=1e-6)
    assert not torch.allclose(constant.shadow_params[0], ramp, rtol=1e-3)


def test_resuming_with_a_new_lr_lambda_and_ema_rate_takes_them_and_logs_them(workspace, tmp_path):
    """EAR's second phase: a new run resumed from the first one's checkpoint with a lower lr and lambda."""
    first = tmp_path / "first"
    # A fresh head gives the same sample for any noise (its output layers start at zero), so the
    # repulsive term, and lambda, only matter once it has trained a few steps.
    flags = ["--warmup-steps", "1", "--lr", "1e-2", "--checkpoint-every", "6"]
    run(parse(train_args(workspace, first, "--max-steps", "6", *flags)))
    second = tmp_path / "second"
    shutil.copytree(first, second)
    run(parse(train_args(workspace, first, "--max-steps", "8", *flags, "--resume", "latest")))  # the same flags
    new = ["--blr", "0.32", "--energy-lambda", "0.5", "--ema-rate", "0.8"]  # lr 0.32 * 4 / 256 = 5e-3
    new_flags = [*flags[:2], *flags[4:], *new]
    run(parse(train_args(workspace, second, "--max-steps", "8", *new_flags, "--resume", "latest")))

    def log(out):
        return {r["step"]: r for r in JsonlLog(out / "train_log.jsonl").read()}

    old_log, new_log = log(first), log(second)
    assert all(new_log[s] == old_log[s] for s in range(1, 7))  # the first phase is kept
    lr = 0.32 * 4 / 256
    assert [(new_log[s]["lr"], new_log[s]["energy_lambda"]) for s in (1, 2, 6, 7, 8)] == [
        (0.0, 1.0),
        (1e-2, 1.0),
        (1e-2, 1.0),
        (lr, 0.5),
        (lr, 0.5),
    ]
    assert [(old_log[s]["lr"], old_log[s]["energy_lambda"]) for s in (7, 8)] == [(1e-2, 1.0), (1e-2, 1.0)]
    # Step 7's loss comes from the same weights (checkpoint-6), before its update: only lambda differs.
    assert new_log[7]["loss"] != old_log[7]["loss"]

    checkpoint = latest_checkpoint(second / "checkpoints")
    groups = json.loads((checkpoint / "optimizer.json").read_text())["param_groups"]
    assert [(g["name"], g["lr"]) for g in groups] == [("no_decay", lr), ("decay", lr), ("head", lr * 0.25)]
    assert json.loads((checkpoint / "ema.json").read_text())["decay"] == 0.8
    run_config = json.loads((second / "run_config.json").read_text())
    assert run_config["resolved"]["lr"] == 1e-2 and run_config["args"]["energy_lambda"] == 1.0
    assert [(r["step"], r["resolved"]["lr"], r["args"]["energy_lambda"]) for r in run_config["resumes"]] == [
        (6, lr, 0.5)
    ]


def test_resuming_with_other_param_groups_is_refused(workspace, tmp_path):
    out = tmp_path / "out"
    run(parse(train_args(workspace, out, "--max-steps", "3")))
    with pytest.raises(
        ValueError, match=r"parameter groups \[\('no_decay', \d+\).*this run's has \[\('backbone_no_decay'"
    ):
        run(
            parse(
                train_args(workspace, out, "--max-steps", "4", "--param-groups", "parscale-v0", "--resume", "latest")
            )
        )

"""Atomic, resumable training checkpoints in a pickle-free format: safetensors and JSON only.

``accelerate``'s ``save_state`` / ``load_state`` unpickle ``*.pkl`` / ``*.bin`` files, so a crafted
checkpoint could run code on ``--resume``. This format holds tensors in safetensors and everything
else in JSON, and loading refuses any folder that holds other files than the ones it writes:

    trainer_state.json      {"format": FORMAT, "step": ..., "files": [...], "interim": ..., ...}; written last
    model.safetensors       the unwrapped model's state dict
    optimizer.safetensors   the optimizer's per-parameter tensors, keys "<param index>.<name>"
    optimizer.json          its per-parameter non-tensor values and its param_groups
    scheduler.json          an LR scheduler's state dict, when the run has one (numbers; LambdaLR's
                            functions are never saved); generator training has none, its lr is a
                            function of the step and the flags (``training/recipe.py``)
    ema.safetensors         the EMA's shadow parameters, keys "<index>"
    ema.json                the EMA's scalars (decay, optimization_step, ...)

No random state is saved: training is reproducible by step (the data order and every random draw
are functions of the seed and the step), so a resumed run continues exactly where the checkpoint
left off. A checkpoint is written into a hidden temporary folder and renamed to
``checkpoint-<step>`` only once ``trainer_state.json`` is on disk; a kill during a save therefore
leaves at worst a temporary folder, which is never loaded and is removed by the next save.

A run saves two kinds of checkpoint. Kept ones, every ``--checkpoint-every`` steps: the newest
``--keep-checkpoints`` of them stay. Interim ones, when ``--checkpoint-minutes`` have passed since
the last save (:class:`CheckpointTimer`), so that a kill loses minutes of training whatever the step
interval: an interim checkpoint does not count against ``--keep-checkpoints`` and the next save of
either kind removes it, so at most one exists and it is always the newest (``--resume latest``
loads it). Saving consumes no random draw, so the step at which a checkpoint is saved does not
change training.

A fresh start (no ``--resume``) is refused over a run's checkpoints (:func:`resume_point`), and
moves the log and record of an earlier run that left none aside instead of overwriting them
(:func:`set_aside_earlier_run`).

DDP and single-process training only: FSDP / DeepSpeed shard the model and optimizer state, which
this format does not gather.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from time import monotonic
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast
from safetensors.torch import load_file, load_model, save_file, save_model

from ..saving import fsync_path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT = "parscale_ear_hf checkpoint v1"
MODEL_FILES = ("model.safetensors",)
OPTIMIZER_FILES = ("optimizer.safetensors", "optimizer.json")
SCHEDULER_FILES = ("scheduler.json",)
EMA_FILES = ("ema.safetensors", "ema.json")
KNOWN_FILES = {*MODEL_FILES, *OPTIMIZER_FILES, *SCHEDULER_FILES, *EMA_FILES}
UNSUPPORTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
EARLIER_RUNS = "earlier-runs"
# The default --checkpoint-minutes. The README's demo runs take 0.6-1.6 s a step on 2 CPU cores, so a step interval
# alone (500) could lose 13 minutes; a save of the demo's models takes well under a second.
CHECKPOINT_MINUTES = 5.0
CHECKPOINT_MINUTES_HELP = (
    "also save an interim checkpoint when this many minutes have passed since the last save, so a kill loses at "
    f"most that much training (default {CHECKPOINT_MINUTES:g}; 0: off). The next save replaces it, it does not count "
    "against --keep-checkpoints, and --resume latest continues exactly from it"
)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as JSON to a temporary file, then rename it: neither a kill nor an object that is not
    JSON-serialisable (raised before any file is opened) leaves a truncated file."""
    text = json.dumps(obj, indent=2, allow_nan=False)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_supported(accelerator: Accelerator) -> None:
    """Raise for the distributed types whose model / optimizer state is sharded (not saved by this format)."""
    if accelerator.distributed_type in UNSUPPORTED:
        raise NotImplementedError(
            f"checkpointing: distributed type {accelerator.distributed_type} shards the model and optimizer "
            "state, which this checkpoint format does not gather; use DDP (`accelerate launch` / torchrun "
            f"without {', '.join(str(t) for t in UNSUPPORTED)})."
        )


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := CHECKPOINT_PATTERN.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


def _refuse(path: Path, problem: str) -> NoReturn:
    raise ValueError(
        f"checkpoint {os.fspath(path)!r} was not written by parscale_ear_hf.training.checkpointing: {problem}. "
        f'A checkpoint is a folder of safetensors and JSON files only ({STATE_FILE} with "format": {FORMAT!r} '
        "and the files it lists). Checkpoints of accelerate's save_state hold pickle files, which are never "
        "loaded because unpickling can run code; start a fresh run instead."
    )


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The ``trainer_state.json`` of a checkpoint that this module wrote; reads no other file.

    Raises ``ValueError`` (naming the folder and what a checkpoint holds) for anything else: a
    checkpoint of ``accelerate.save_state`` (pickle files), a missing file, or a file that this
    format never writes (e.g. a planted ``custom_checkpoint_0.pkl``).
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        _refuse(path, f"{STATE_FILE} cannot be read as JSON ({e})")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        _refuse(path, f'{STATE_FILE} has no "format": {FORMAT!r}')
    listed = state.get("files")
    if not (isinstance(listed, list) and all(isinstance(f, str) and f in KNOWN_FILES for f in listed)):
        _refuse(path, f"{STATE_FILE} lists the files {listed!r}, not a list of {sorted(KNOWN_FILES)}")
    present, expected = {p.name for p in path.iterdir()}, {STATE_FILE, *listed}
    if present - expected:
        _refuse(path, f"it holds files that this format never writes: {sorted(present - expected)}")
    if expected - present:
        _refuse(path, f"it lacks {sorted(expected - present)}")
    return state


def resolve_resume(resume: str | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """``--resume`` -> the checkpoint to load: None (start fresh), "latest", or a checkpoint path.

    Raises before any training starts when asked to resume and there is nothing to resume from, or
    when the checkpoint is not in this module's format (:func:`read_checkpoint_state`).
    """
    if resume is None:
        return None
    if resume == "latest":
        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            raise FileNotFoundError(
                f"--resume latest: no complete checkpoint (a `checkpoint-<step>` folder with {STATE_FILE}) in "
                f"{os.fspath(checkpoint_dir)!r}; start without --resume, or pass a checkpoint folder."
            )
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"--resume {resume!r}: not a complete checkpoint (no {STATE_FILE}); pass 'latest' or a "
                f"`checkpoint-<step>` folder written by this script."
            )
    read_checkpoint_state(path)
    return path


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run in ``output_dir`` keeps its checkpoints."""
    return Path(output_dir) / "checkpoints"


def resume_point(owner: str, resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint that ``--resume`` names (:func:`resolve_resume`), or None for a fresh start.

    Raises before any work when there is nothing to resume, and for a fresh start over the checkpoints in
    ``output_dir`` (it would overwrite them). ``owner`` names the command in the message.
    """
    checkpoints = checkpoint_dir(output_dir)
    resume_from = resolve_resume(resume, checkpoints)
    if resume_from is None and list_checkpoints(checkpoints):
        raise FileExistsError(
            f"{owner}: {os.fspath(checkpoints)!r} already holds checkpoints; pass --resume latest to continue that "
            "run, or another --output-dir (a fresh start would overwrite them)."
        )
    return resume_from


def set_aside_earlier_run(output_dir: str | os.PathLike, names: list[str]) -> Path | None:
    """Move the files ``names`` of ``output_dir`` that exist into ``<output_dir>/earlier-runs/<k>`` (the first free
    ``k`` from 1), and say so; returns that folder, or None when none of them exists.

    A fresh start calls it on the main process before its first step, for its log and run record: the earlier run
    that wrote them left no checkpoint (:func:`resume_point` refuses a fresh start over checkpoints), so there is
    nothing to resume, and its record is kept rather than overwritten.
    """
    output_dir = Path(output_dir)
    found = [name for name in names if (output_dir / name).exists()]
    if not found:
        return None
    k = 1
    while (output_dir / EARLIER_RUNS / str(k)).exists():
        k += 1
    folder = output_dir / EARLIER_RUNS / str(k)
    folder.mkdir(parents=True)
    for name in found:
        os.replace(output_dir / name, folder / name)
    print(
        f"{os.fspath(output_dir)!r} holds an earlier run that left no checkpoint; moved its {', '.join(found)} to "
        f"{os.fspath(folder)!r} (a fresh start never overwrites them)."
    )
    return folder


class CheckpointTimer:
    """Whether an interim checkpoint is due: ``minutes`` (``--checkpoint-minutes``) have passed since the last save
    (0: never).

    The main process reads its clock and broadcasts the decision, so that every process saves at the same step.

    Args:
        accelerator: the run's; the decision travels as a tensor on its device.
        minutes: the longest stretch of training that a kill may lose (plus the step that is running).
    """

    def __init__(self, accelerator: Accelerator, minutes: float):
        self.accelerator, self.seconds = accelerator, 60.0 * minutes
        self.saved()

    def saved(self) -> None:
        """Start counting again (after a save of either kind)."""
        self.last = monotonic()

    def due(self) -> bool:
        """The main process's answer; call on every process at the same step."""
        if not self.seconds:
            return False
        elapsed = torch.tensor(float(monotonic() - self.last >= self.seconds), device=self.accelerator.device)
        return bool(broadcast(elapsed, from_process=0).item())


def _is_interim(checkpoint: Path) -> bool:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("interim") is True
    except (OSError, ValueError, AttributeError):
        return False


def _files_for(scheduler, ema) -> list[str]:
    return [
        *MODEL_FILES,
        *OPTIMIZER_FILES,
        *(SCHEDULER_FILES if scheduler is not None else ()),
        *(EMA_FILES if ema is not None else ()),
    ]


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        scalars[str(index)] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"{index}.{k}": v.contiguous() for k, v in values.items() if isinstance(v, torch.Tensor)})
    save_file(tensors, folder / "optimizer.safetensors")
    write_json_atomic(folder / "optimizer.json", {"state": scalars, "param_groups": state["param_groups"]})


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    saved = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    state = {int(index): dict(values) for index, values in saved["state"].items()}
    for key, tensor in load_file(folder / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    # The state is keyed by position across the groups: other groups of the same sizes would give
    # each parameter another one's moments without an error from torch.
    saved_groups = [(g.get("name"), len(g["params"])) for g in saved["param_groups"]]
    groups = [(g.get("name"), len(g["params"])) for g in optimizer.param_groups]
    if saved_groups != groups:
        raise ValueError(
            f"checkpoint {os.fspath(folder)!r}: its optimizer has the parameter groups {saved_groups} (name, size), "
            f"this run's has {groups}; resume with the groups it was trained with (e.g. the same --param-groups)."
        )
    # JSON has no tuples; torch's optimizers keep e.g. AdamW's betas as one.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in saved["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_ema(ema, folder: Path) -> None:
    state = ema.state_dict()
    save_file({str(i): p.contiguous() for i, p in enumerate(state.pop("shadow_params"))}, folder / "ema.safetensors")
    write_json_atomic(folder / "ema.json", state)


def _load_ema(ema, folder: Path) -> None:
    loaded = load_file(folder / "ema.safetensors")
    shadow = [loaded.get(str(i)) for i in range(len(ema.shadow_params))]
    if len(loaded) != len(shadow) or any(t is None or t.shape != p.shape for t, p in zip(shadow, ema.shadow_params)):
        raise ValueError(
            f"checkpoint {os.fspath(folder)!r}: ema.safetensors holds {len(loaded)} tensors that do not match the "
            f"{len(shadow)} EMA parameters of the model being trained; resume with the same model config."
        )
    scalars = json.loads((folder / "ema.json").read_text(encoding="utf-8"))
    ema.load_state_dict(
        {**scalars, "shadow_params": [t.to(device=p.device, dtype=p.dtype) for t, p in zip(shadow, ema.shadow_params)]}
    )


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_dir: str | os.PathLike,
    step: int,
    state: dict,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    ema=None,
    keep: int = 2,
    interim: bool = False,
) -> Path:
    """Save the model, optimizer and (if given) LR scheduler and ``diffusers`` EMAModel for ``step``; atomically.

    Call on every process; the main process writes (under DDP every process holds the same state).
    ``state`` (JSON-serialisable, e.g. the log position) goes into ``trainer_state.json``, written
    last as the mark of a complete checkpoint. Removes the interim checkpoint an earlier save left, and
    keeps the newest ``keep`` checkpoints that are not interim; ``interim`` marks this one as interim (the
    time-based save, :class:`CheckpointTimer`), which the next save removes.
    """
    check_supported(accelerator)
    root = Path(checkpoint_dir)
    final = root / f"checkpoint-{step:08d}"
    tmp = root / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale)
        tmp.mkdir()
        save_model(accelerator.unwrap_model(model), os.fspath(tmp / "model.safetensors"))
        _save_optimizer(optimizer, tmp)
        if scheduler is not None:
            write_json_atomic(tmp / "scheduler.json", scheduler.state_dict())
        if ema is not None:
            _save_ema(ema, tmp)
        for file in tmp.iterdir():  # on disk before the completeness mark, even after a power loss
            fsync_path(file)
        files = _files_for(scheduler, ema)
        write_json_atomic(
            tmp / STATE_FILE, {**state, "format": FORMAT, "step": step, "files": files, "interim": interim}
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        for old in list_checkpoints(root):
            if old != final and _is_interim(old):
                shutil.rmtree(old)
        for old in [p for p in list_checkpoints(root) if not _is_interim(p)][:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    ema=None,
) -> dict:
    """Restore on this process what :func:`save_checkpoint` saved; returns its ``state`` dict.

    Reads only JSON and safetensors. The checkpoint must hold exactly the parts passed here.
    """
    check_supported(accelerator)
    path = Path(path)
    state = read_checkpoint_state(path)
    expected = _files_for(scheduler, ema)
    if sorted(state["files"]) != sorted(expected):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} holds {sorted(state['files'])}, but this run restores {sorted(expected)} "
            "(a checkpoint of another training script?)."
        )
    try:
        load_model(accelerator.unwrap_model(model), path / "model.safetensors", strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r}: model.safetensors does not fit the model being trained; resume with "
            f"the same model config ({e})."
        ) from e
    _load_optimizer(optimizer, path)
    if scheduler is not None:
        saved = json.loads((path / "scheduler.json").read_text(encoding="utf-8"))
        if set(saved) != set(scheduler.state_dict()):
            raise ValueError(
                f"checkpoint {os.fspath(path)!r}: scheduler.json has the fields {sorted(saved)}, not the "
                f"{sorted(scheduler.state_dict())} of {type(scheduler).__name__}."
            )
        scheduler.load_state_dict(saved)
    if ema is not None:
        _load_ema(ema, path)
    return {k: v for k, v in state.items() if k not in ("format", "files", "interim")}


class JsonlLog:
    """Append-only training log, one JSON object per line, flushed per line.

    On resume, :meth:`truncate_after` drops the lines of steps after the checkpoint (they will
    be recomputed) and any half-written last line left by a kill.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

"""Atomic, resumable training checkpoints on top of ``accelerate``'s ``save_state`` / ``load_state``.

A checkpoint is written into a hidden temporary folder and renamed to ``checkpoint-<step>`` only
once every process has finished writing and ``trainer_state.json`` is on disk; a kill during a
save therefore leaves at worst a temporary folder, which is never loaded and is removed by the
next save. Training is reproducible by step (the data order and every random draw are functions
of the seed and the step), so a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def resolve_resume(resume: str | None, checkpoint_dir: str | os.PathLike) -> Path | None:
    """``--resume`` -> the checkpoint to load: None (start fresh), "latest", or a checkpoint path.

    Raises before any training starts when asked to resume and there is nothing to resume from.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            raise FileNotFoundError(
                f"--resume latest: no complete checkpoint (a `checkpoint-<step>` folder with {STATE_FILE}) in "
                f"{os.fspath(checkpoint_dir)!r}; start without --resume, or pass a checkpoint folder."
            )
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume!r}: not a complete checkpoint (no {STATE_FILE}); pass 'latest' or a "
            f"`checkpoint-<step>` folder written by this script."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator, checkpoint_dir: str | os.PathLike, step: int, state: dict, keep: int = 2
) -> Path:
    """Save models, optimizers, schedulers, registered objects and RNG states for ``step``; atomically.

    Call on every process. ``state`` (JSON-serialisable, e.g. the step and the log position) is
    written last, as the mark of a complete checkpoint. Keeps the newest ``keep`` checkpoints.
    """
    root = Path(checkpoint_dir)
    final = root / f"checkpoint-{step:08d}"
    tmp = root / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.fspath(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump({**state, "step": step}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict:
    """Restore everything :func:`save_checkpoint` saved; returns its ``state`` dict."""
    accelerator.load_state(os.fspath(path))
    with open(Path(path) / STATE_FILE, encoding="utf-8") as f:
        return json.load(f)


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

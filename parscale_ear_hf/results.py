"""Results files: every figure the project shows is written here by a command, with provenance.

A results JSON holds the payload plus where it came from (command, git revision, machine,
time), and README sections are regenerated from such files between marker comments, never
typed by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def git_revision(repo_dir: str | os.PathLike | None = None) -> str:
    """``HEAD``'s commit hash, with ``-dirty`` when tracked files differ from it; "unknown" outside git."""
    cwd = repo_dir or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def machine_description() -> dict:
    """What the numbers were measured on: CPU, core count, accelerator, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def provenance() -> dict:
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_revision": git_revision(),
        "machine": machine_description(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(path: str | os.PathLike, payload: dict) -> dict:
    """Write ``payload`` plus :func:`provenance` to ``path`` atomically; returns what was written."""
    record = {**payload, "provenance": provenance()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- {name}:start -->`` and ``<!-- {name}:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"replace_section: expected exactly one '{start}' ... '{end}' pair in the document.")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body.rstrip()}\n{end}{tail}"


def update_readme(readme: str | os.PathLike, name: str, body: str) -> None:
    path = Path(readme)
    path.write_text(replace_section(path.read_text(encoding="utf-8"), name, body), encoding="utf-8")


def load_results(path: str | os.PathLike) -> dict | None:
    """A results JSON, or None when the command that writes it has not been run."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _revision(record: dict) -> str:
    """Short revision; "-dirty" when the command ran with uncommitted changes."""
    revision = record["provenance"]["git_revision"]
    return revision[:12] + ("-dirty" if revision.endswith("-dirty") else "")


def demo_results_table(results_dir: str | os.PathLike) -> str:
    """Markdown table of the demo model's measured figures, each with the file it comes from."""
    results_dir = Path(results_dir)
    rows = ["| what | value | measured on | results file (revision) |", "|---|---:|---|---|"]
    vae = load_results(results_dir / "demo_vae_psnr.json")
    if vae:
        rows.append(
            f"| LiteVAE reconstruction PSNR | {vae['value']:.2f} dB | {vae.get('dataset', '')} "
            f"{vae.get('split', '')} | `demo_vae_psnr.json` ({_revision(vae)}) |"
        )
    judge = load_results(results_dir / "digit_classifier.json")
    if judge:
        rows.append(
            f"| digit classifier (the judge) accuracy | {100 * judge['value']:.1f}% | {judge['data']} "
            f"| `digit_classifier.json` ({_revision(judge)}) |"
        )
    gen = load_results(results_dir / "demo_class_accuracy.json")
    if gen:
        opts = gen["sampling"]
        rows.append(
            f"| generated digits recognised as the requested class | {100 * gen['value']:.1f}% | "
            f"{gen['num_images']} generated images ({opts['num_inference_steps']} steps, guidance "
            f"{opts['guidance_scale']}, temperature {opts['temperature']}, seed {opts['seed']}) "
            f"| `demo_class_accuracy.json` ({_revision(gen)}) |"
        )
    if len(rows) == 2:
        return "_No demo figures yet: run `bash examples/train_demo.sh`._"
    return "\n".join(rows)

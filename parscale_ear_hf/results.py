"""Results files: every figure the project shows is written here by a command, with provenance.

A results JSON holds the payload plus where it came from (command, git revision, machine,
time); tables and model cards are built from such files, never typed by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def git_revision(repo_dir: str | os.PathLike | None = None) -> str:
    """``HEAD``'s commit hash, with ``-dirty`` when tracked files other than generated ones (``results/``,
    README tables and model cards) differ from it; "unknown" outside git."""
    cwd = repo_dir or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # Figures and READMEs written by earlier commands of the same run do not make it dirty.
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)results",
                ":(exclude)*README.md",
            ],
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


def load_results(path: str | os.PathLike) -> dict | None:
    """A results JSON, or None when the command that writes it has not been run."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def short_revision(record: dict) -> str:
    """A results record's git revision, short; "-dirty" when the command ran with uncommitted changes."""
    revision = record["provenance"]["git_revision"]
    return revision[:12] + ("-dirty" if revision.endswith("-dirty") else "")


# ------------------------------------------------------------------------------ evaluation results

# What `evaluation.run` (examples/eval_fid.py) writes, and what a table or model card row needs of it.
EVAL_RESULT_FIELDS = {
    "metric": (),
    "value": (),
    "metrics": (),
    "model": (),
    "samples": ("images_per_class", "total"),
    "reference": ("source", "count"),
    "extractor": ("name",),
    "sampling": ("num_inference_steps", "guidance_scale", "guidance_schedule", "temperature", "seed"),
    "provenance": ("command", "git_revision", "machine", "time_utc"),
}
EVAL_RESULTS_ACCEPTED = "a results JSON written by examples/eval_fid.py (`--results-file`)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_eval_results(record: dict, source: str) -> dict:
    """Raise a ValueError naming `source` and the field when `record` is not an evaluation result.

    Args:
        record: a parsed results JSON.
        source: where it came from (a file name), for the error message.

    Returns:
        `record`, unchanged.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"{source}: holds a {type(record).__name__}, not an object; expected {EVAL_RESULTS_ACCEPTED}."
        )
    missing = [key for key in EVAL_RESULT_FIELDS if key not in record]
    if missing:
        raise ValueError(f"{source}: has no {', '.join(map(repr, missing))}; expected {EVAL_RESULTS_ACCEPTED}.")
    for key, fields in EVAL_RESULT_FIELDS.items():
        if key == "sampling" and record[key] is None:  # a VAE reconstruction result samples nothing
            continue
        if fields and not (isinstance(record[key], dict) and all(f in record[key] for f in fields)):
            raise ValueError(
                f"{source}: {key!r} must be an object with {', '.join(map(repr, fields))}; got {record[key]!r}."
            )
    if not _is_number(record["value"]):
        raise ValueError(f"{source}: 'value' is {record['value']!r}; expected a finite number.")
    metrics = record["metrics"]
    if not isinstance(metrics, dict) or not metrics or not all(_is_number(v) for v in metrics.values()):
        raise ValueError(f"{source}: 'metrics' is {metrics!r}; expected an object of metric name -> finite number.")
    return record


def read_eval_results(path: str | os.PathLike) -> dict:
    """An evaluation results JSON, checked by :func:`check_eval_results`.

    Args:
        path: the file written by examples/eval_fid.py.

    Returns:
        The parsed record.

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: it is not valid JSON or not an evaluation result.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)!r} is not a file; pass {EVAL_RESULTS_ACCEPTED}.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON ({error}).") from error
    return check_eval_results(record, os.fspath(path))


def format_number(value: float) -> str:
    """A figure as tables show it: 4 significant digits."""
    return f"{value:.4g}"


def samples_summary(samples: dict) -> str:
    """A result's `samples`: how many images were scored."""
    if samples["images_per_class"] is None:
        return f"{samples['total']:,} ({samples.get('what', 'images')})"
    return f"{samples['total']:,} ({samples['images_per_class']:,} per class)"


def reference_summary(reference: dict) -> str:
    """A result's `reference`: what the samples were compared with."""
    count = f" ({reference['count']:,} images)" if reference["count"] is not None else ""
    return f"`{reference['source']}`{count}"


def sampling_summary(sampling: dict | None) -> str:
    """A result's `sampling`: the pipeline options the samples were made with ("-" for none)."""
    if sampling is None:
        return "-"
    return (
        f"{sampling['num_inference_steps']} steps, guidance {sampling['guidance_scale']} "
        f"({sampling['guidance_schedule']}), temperature {sampling['temperature']}, seed {sampling['seed']}"
    )


def machine_summary(machine: dict) -> str:
    """A provenance `machine` (:func:`machine_description`) in one line: accelerator or CPU, torch version."""
    device = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('cpu_count')} cores)"
    return f"{device}, torch {machine.get('torch')}"

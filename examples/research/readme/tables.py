"""The README's generated tables: the demo model's figures, the evaluation results, the test suite's time,
and the marker-comment sections they replace (`examples/update_readme.py`). Never typed by hand."""

from __future__ import annotations

import os
from pathlib import Path

from parscale_ear_hf.results import (
    format_number,
    load_results,
    machine_summary,
    read_eval_results,
    reference_summary,
    samples_summary,
    sampling_summary,
    short_revision,
)


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


def demo_results_table(results_dir: str | os.PathLike) -> str:
    """Markdown table of the demo model's measured figures, each with the file it comes from."""
    results_dir = Path(results_dir)
    rows = ["| what | value | measured on | results file (revision) |", "|---|---:|---|---|"]
    vae = load_results(results_dir / "demo_vae_psnr.json")
    if vae:
        rows.append(
            f"| LiteVAE reconstruction PSNR | {vae['value']:.2f} dB | {vae.get('dataset', '')} "
            f"{vae.get('split', '')} | `demo_vae_psnr.json` ({short_revision(vae)}) |"
        )
    judge = load_results(results_dir / "digit_classifier.json")
    if judge:
        rows.append(
            f"| digit classifier (the judge) accuracy | {100 * judge['value']:.1f}% | {judge['data']} "
            f"| `digit_classifier.json` ({short_revision(judge)}) |"
        )
    gen = load_results(results_dir / "demo_class_accuracy.json")
    if gen:
        opts = gen["sampling"]
        rows.append(
            f"| generated digits recognised as the requested class | {100 * gen['value']:.1f}% | "
            f"{gen['num_images']} generated images ({opts['num_inference_steps']} steps, guidance "
            f"{opts['guidance_scale']}, temperature {opts['temperature']}, seed {opts['seed']}) "
            f"| `demo_class_accuracy.json` ({short_revision(gen)}) |"
        )
    if len(rows) == 2:
        return "_No demo figures yet: run `bash examples/train_demo.sh`._"
    return "\n".join(rows)


def test_suite_summary(results_dir: str | os.PathLike) -> str:
    """One line on how long `make test`'s suite took, from ``test_suite.json`` (examples/time_test_suite.py)."""
    record = load_results(Path(results_dir) / "test_suite.json")
    if record is None:
        return "_Suite time not measured yet: run `python examples/time_test_suite.py`._"
    minutes, seconds = divmod(round(record["value"]), 60)
    counts = ", ".join(f"{n} {kind}" for kind, n in record["counts"].items())
    return (
        f"The suite ({counts}) took {minutes} min {seconds:02d} s on "
        f"{machine_summary(record['provenance']['machine'])}, at `{short_revision(record)}` "
        "(`results/test_suite.json`, written by `python examples/time_test_suite.py`)."
    )


def eval_results_table(results_dir: str | os.PathLike) -> str:
    """Markdown table of every ``<results_dir>/eval/*.json`` (sorted by file name), one row per file.

    Args:
        results_dir: the folder holding ``eval/`` (the repository's ``results/``).

    Returns:
        The table, or a one-line note when there is no evaluation result yet.
    """
    files = sorted((Path(results_dir) / "eval").glob("*.json"))
    if not files:
        return (
            "_No evaluation results yet: run `examples/eval_fid.py ... --results-file results/eval/NAME.json`, "
            "then `python examples/update_readme.py`._"
        )
    rows = [
        "| model | metrics | samples | reference | extractor | sampling | results file (revision) |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in files:
        record = read_eval_results(path)
        metrics = ", ".join(f"`{key}` {format_number(value)}" for key, value in record["metrics"].items())
        rows.append(
            f"| `{record['model']}` | {metrics} | {samples_summary(record['samples'])} | "
            f"{reference_summary(record['reference'])} | {record['extractor']['name']} | "
            f"{sampling_summary(record['sampling'])} | `eval/{path.name}` ({short_revision(record)}) |"
        )
    return "\n".join(rows)

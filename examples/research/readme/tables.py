"""The generated tables of the README and the docs/ pages: the demo model's figures, the evaluation results,
the test suite's time, the grid's verdicts, notes on what a table measured, and the marker-comment sections
they replace in whichever page holds them (`examples/update_readme.py`). Never typed by hand."""

from __future__ import annotations

import os
import re
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


def markdown_documents(root: str | os.PathLike) -> list[Path]:
    """The pages that may hold generated sections: ``README.md`` and ``docs/*.md`` under ``root``."""
    root = Path(root)
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def section_document(root: str | os.PathLike, name: str) -> Path:
    """The one page of :func:`markdown_documents` that holds the ``<!-- {name}:start -->`` marker."""
    marker = f"<!-- {name}:start -->"
    holders = [path for path in markdown_documents(root) if marker in path.read_text(encoding="utf-8")]
    if len(holders) != 1:
        raise ValueError(
            f"section_document: expected one page under {root} (README.md, docs/*.md) holding '{marker}', "
            f"found {[str(path) for path in holders]}."
        )
    return holders[0]


# A Markdown link or image target that is a path (no scheme, no anchor-only, not absolute).
_RELATIVE_LINK = re.compile(r"(!?\[[^\]]*\])\((?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)\)")


def relink(body: str, document: Path, root: str | os.PathLike) -> str:
    """Rewrite the relative links of ``body``, written from the repository root, as seen from ``document``."""
    base = Path(os.path.relpath(Path(root).resolve(), document.parent.resolve()))

    def target(match: re.Match) -> str:
        return f"{match.group(1)}({(base / match.group(2)).as_posix().removeprefix('./')})"

    return _RELATIVE_LINK.sub(target, body)


def update_section(root: str | os.PathLike, name: str, body: str) -> Path:
    """Write ``body`` (links relative to the repository root) between the markers of section ``name``, in the page
    under ``root`` that holds them; returns that page."""
    path = section_document(root, name)
    text = replace_section(path.read_text(encoding="utf-8"), name, relink(body, path, root))
    path.write_text(text, encoding="utf-8")
    return path


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


# ------------------------------------------------------------------------------ which model a table measured

DEMO_MODEL = "models/mnist_demo"
ISSUE_RERUN = "issue 28"


def _ran_demo_model(row: dict, results_dir: Path) -> bool:
    """Whether a benchmark measurement ran the demo model: named by its path, as the sampling benchmark's "demo"
    config, or through a results file (``results/...``, read from ``results_dir``) whose settings name it."""
    config = row.get("config")
    if isinstance(config, str) and (config == "demo" or config.startswith(DEMO_MODEL)):
        return True
    results_file = row.get("results_file")
    if isinstance(results_file, str) and results_file.startswith("results/"):
        record = load_results(results_dir / results_file.removeprefix("results/"))
        return bool(record) and record.get("settings", {}).get("model") == DEMO_MODEL
    return False


def former_demo_model_note(results_dir: str | os.PathLike, record: dict | None, sections: tuple[str, ...]) -> str:
    """The first line of a benchmark table: which of its ``sections`` measured ``models/mnist_demo`` before the
    grid's best cell replaced it (``experiments_ship.json``'s time), and so measured a model that no longer ships.

    The former model's parameter count is the grid's base cell's (the cell that trains the base config, the former
    demo model's, unchanged). Returns "" when no section of ``record`` measured a former model.
    """
    from research.evidence_grid import experiments

    results_dir = Path(results_dir)
    ship = load_results(results_dir / "experiments_ship.json")
    if record is None or ship is None:
        return ""
    shipped_at = ship["provenance"]["time_utc"]
    provenance = record["section_provenance"]
    ran = {key.split("/", 1)[0] for key, row in record["measurements"].items() if _ran_demo_model(row, results_dir)}
    former = sorted(s for s in ran if s in sections and s in provenance and provenance[s]["time_utc"] < shipped_at)
    if not former:
        return ""
    base = next(cell for cell in experiments.CELLS if cell.kind == "ear" and not cell.flags and not cell.config)
    runs = experiments.load_grid(results_dir / "experiments").get(base.name)
    if not runs:
        raise ValueError(
            f"former_demo_model_note: no complete run of the grid's base cell '{base.name}' in {results_dir}."
        )
    names = ", ".join(f"`{section}`" for section in former)
    return (
        f"_The demo-model rows (sections {names}) were measured on the former "
        f"{runs[0]['parameters'] / 1e6:.1f}M-parameter demo model, which no longer ships "
        f"(`{runs[0]['settings']['base_config']}`, "
        f"the grid's `{base.name}` cell); a rerun on `{DEMO_MODEL}` (the grid's `{ship['cell']}` cell since "
        f"{shipped_at[:10]}) is pending ({ISSUE_RERUN})._"
    )


# ------------------------------------------------------------------------------ the grid in short


def grid_summary(results_dir: str | os.PathLike) -> str:
    """The README's short account of the evidence grid: per claim, the FID (or time) change and the verdict,
    computed from ``results/experiments/`` as the full report's claims table is."""
    from research.evidence_grid import experiments

    grid = experiments.load_grid(Path(results_dir, "experiments"))
    total = sum(len(runs) for runs in grid.values())
    if not total:
        return "_No run of the grid is complete yet: `python examples/experiments.py` runs it._"
    settings = next(r["settings"] for runs in grid.values() for r in runs)
    lines = [
        f"_{total} runs ({len(experiments.CELLS)} cells x {len(experiments.SEEDS)} seeds, "
        f"{settings['training_steps']} training steps each on the demo latents), scored against "
        f"`{settings['dataset']}` [{settings['split']}]. A vs B: A's mean relative to B's; beyond the spread: the "
        "means differ by more than the sum of the two standard deviations. Full report: "
        "[docs/experiments.md](docs/experiments.md)._",
        "",
        "| claim | A vs B | beyond the spread? | verdict |",
        "|---|---:|---|---|",
    ]
    yes_no = {True: "yes", False: "no", None: "-"}
    for claim, metric, a, b, support in experiments.COMPARISONS:
        v = experiments.verdict(grid, metric, a, b, support)
        name = experiments.METRIC_NAMES[metric][0]
        change = f"{name} {v['change']:+.1%}" if "change" in v else "-"
        lines.append(f"| {claim} (`{a}` vs `{b}`) | {change} | {yes_no[v.get('beyond_spread')]} | {v['verdict']} |")
    return "\n".join(lines)

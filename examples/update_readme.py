"""Regenerate the generated tables of README.md and docs/*.md from the results JSON files (never typed by hand).

python examples/update_readme.py

Each table sits between `<!-- name:start -->` and `<!-- name:end -->` in one of those pages; the updater finds the
page that holds each pair and writes its links relative to that page.
"""

import argparse
from pathlib import Path

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.info import parameter_table
from parscale_ear_hf.results import load_results
from research.benchmarks import bench_sampling, sampling_flops
from research.benchmarks.benchmark import performance_section, write_reports
from research.evidence_grid import experiments
from research.readme.tables import (
    demo_results_table,
    eval_results_table,
    former_demo_model_note,
    grid_summary,
    test_suite_summary,
    update_section,
)

SAMPLING_SECTIONS = bench_sampling.SECTIONS  # the benchmark's sections in the sampling-speed table


def with_notes(results_dir: str, body: str, sampling: bool) -> str:
    """A benchmark table with, as its first line, which of its rows measured a demo model that no longer ships."""
    notes = []
    for profile in ("gpu", "cpu"):
        record = load_results(Path(results_dir, f"benchmark_{profile}.json"))
        if record is None:
            continue
        sections = tuple(s for s in record["section_provenance"] if (s in SAMPLING_SECTIONS) == sampling)
        note = former_demo_model_note(results_dir, record, sections)
        if note and note not in notes:
            notes.append(note)
    return "\n\n".join([*notes, body])


def main(args: argparse.Namespace) -> None:
    counts = load_results(f"{args.results_dir}/param_counts.json")
    if counts is None:
        raise FileNotFoundError(
            f"{args.results_dir}/param_counts.json is missing: run examples/param_counts.py first."
        )
    for profile in ("cpu", "gpu"):  # tables and plots are derived from the JSON files only
        if Path(args.results_dir, f"benchmark_{profile}.json").is_file():
            write_reports(Path(args.results_dir, f"benchmark_{profile}.json"))
            bench_sampling.write_report(Path(args.results_dir, f"benchmark_{profile}.json"))
    experiments.write_report(args.results_dir)
    sections = {
        "param-table": f"{parameter_table(counts['components'])}\n\n_From `results/param_counts.json`, written by "
        "`python examples/param_counts.py`._",
        "demo-results": demo_results_table(args.results_dir),
        "eval-results": eval_results_table(args.results_dir),
        "test-suite": test_suite_summary(args.results_dir),
        "performance": with_notes(args.results_dir, performance_section(args.results_dir), sampling=False),
        "sampling-speed": with_notes(args.results_dir, bench_sampling.readme_section(args.results_dir), sampling=True),
        "sampling-flops": sampling_flops.readme_section(args.results_dir),
        "experiments": experiments.readme_section(args.results_dir),
        "grid-summary": grid_summary(args.results_dir),
    }
    pages = sorted({str(update_section(args.root, name, body)) for name, body in sections.items()})
    print(f"updated {', '.join(pages)} from {args.results_dir}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the folder holding README.md and docs/ (default: .)")
    parser.add_argument("--results-dir", default="results")
    run_script(parser, main)

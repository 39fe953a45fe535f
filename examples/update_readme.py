"""Regenerate the README's tables from the results JSON files (never typed by hand).

python examples/update_readme.py
"""

import argparse
from pathlib import Path

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.info import parameter_table
from parscale_ear_hf.results import load_results
from research.benchmarks import bench_sampling
from research.benchmarks.benchmark import performance_section, write_reports
from research.evidence_grid import experiments
from research.readme.tables import demo_results_table, eval_results_table, test_suite_summary, update_readme


def main(args: argparse.Namespace) -> None:
    counts = load_results(f"{args.results_dir}/param_counts.json")
    if counts is None:
        raise FileNotFoundError(
            f"{args.results_dir}/param_counts.json is missing: run examples/param_counts.py first."
        )
    update_readme(
        args.readme,
        "param-table",
        f"{parameter_table(counts['components'])}\n\n_From `results/param_counts.json`, written by "
        "`python examples/param_counts.py`._",
    )
    update_readme(args.readme, "demo-results", demo_results_table(args.results_dir))
    update_readme(args.readme, "eval-results", eval_results_table(args.results_dir))
    update_readme(args.readme, "test-suite", test_suite_summary(args.results_dir))
    for profile in ("cpu", "gpu"):  # tables and plots are derived from the JSON files only
        if Path(args.results_dir, f"benchmark_{profile}.json").is_file():
            write_reports(Path(args.results_dir, f"benchmark_{profile}.json"))
            bench_sampling.write_report(Path(args.results_dir, f"benchmark_{profile}.json"))
    update_readme(args.readme, "performance", performance_section(args.results_dir))
    update_readme(args.readme, "sampling-speed", bench_sampling.readme_section(args.results_dir))
    experiments.write_report(args.results_dir)
    update_readme(args.readme, "experiments", experiments.readme_section(args.results_dir))
    print(f"updated {args.readme} from {args.results_dir}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--results-dir", default="results")
    run_script(parser, main)

"""Run the test suite once and record how long it took: the figure the README states.

    python examples/time_test_suite.py --results-file results/test_suite.json   # then examples/update_readme.py

Extra arguments after `--` go to pytest. The suite's exit status is recorded and returned: a failing
suite is never recorded as a time to expect.
"""

import argparse
import re
import subprocess
import sys
import time

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.results import write_results


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    if proc.returncode != 0:
        raise ChildProcessError(
            f"time_test_suite: pytest failed (exit {proc.returncode}); nothing recorded: {summary}"
        )
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|xfailed|deselected)", summary)}
    record = write_results(
        args.results_file,
        {"metric": "test_suite_seconds", "value": round(seconds, 1), "counts": counts, "pytest_summary": summary},
    )
    print(f"{args.results_file}: {record['value']} s, {counts}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-file", default="results/test_suite.json")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    run_script(parser, main)

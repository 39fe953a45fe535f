"""Peak memory of examples/eval_fid.py at N and at factor x N samples, measured in one run.

    python examples/bench_eval_memory.py --images-per-class 20 --factor 4 \
        --results-file results/eval_memory_scaling.json -- \
        --model models/mnist_demo --extractor digit --classifier models/digit_classifier \
        --dataset data/mnist_demo --split heldout --steps 16 --reference-cache-dir runs/fid_refs

Everything after `--` goes to eval_fid.py as it is. Each size runs in a fresh process with a
fresh output folder; its peak resident memory is what eval_fid.py records (`peak_rss_mib`).
Images are made, scored and dropped batch by batch, so only the features (feature_dim floats per
sample) grow with N.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.results import write_results

EVAL_FID = Path(__file__).resolve().parent / "eval_fid.py"


def main(args: argparse.Namespace) -> None:
    eval_args = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    for flag in ("--images-per-class", "--num-samples", "--output-dir", "--results-file"):
        if flag in eval_args:
            raise ValueError(f"{flag} is set by this benchmark; leave it out of the eval_fid.py arguments.")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for per_class in (args.images_per_class, args.factor * args.images_per_class):
            out = Path(tmp) / f"n{per_class}"
            command = [sys.executable, str(EVAL_FID), *eval_args, "--images-per-class", str(per_class)]
            subprocess.run([*command, "--output-dir", str(out)], check=True, stdout=subprocess.DEVNULL)
            record = json.loads((out / "results.json").read_text())
            runs.append(
                {
                    "samples": record["samples"]["total"],
                    "peak_rss_mib": record["peak_rss_mib"],
                    "seconds": record["seconds"],
                    "feature_dim": record["extractor"]["feature_dim"],
                }
            )
    small, large = runs
    payload = {
        "metric": "eval_peak_rss_ratio",
        "value": large["peak_rss_mib"] / small["peak_rss_mib"],
        "definition": f"peak RSS of eval_fid.py at {args.factor}x the samples / at 1x, each in a fresh process",
        "runs": runs,
        "eval_fid_arguments": eval_args,
    }
    write_results(args.results_file, payload)
    print(
        f"peak RSS {small['peak_rss_mib']:.0f} MiB at N={small['samples']}, {large['peak_rss_mib']:.0f} MiB at "
        f"N={large['samples']}: ratio {payload['value']:.3f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-class", type=int, default=20, help="N / number of classes")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--results-file", required=True)
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="-- then eval_fid.py arguments")
    run_script(parser, main)

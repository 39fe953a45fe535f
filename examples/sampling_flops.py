"""FLOPs per image of EAR-B/L/H sampling (P = 1, 2; 64 and 16 steps; exact and cached) and what they allow on an
H100, computed, not measured; or, with --measure, the same rows timed on a GPU (examples/bench_gpu.sh).

python examples/sampling_flops.py              # results/sampling_flops.json
python examples/update_readme.py               # then the `sampling-flops` table of docs/benchmarks.md

The logic and its documentation: examples/research/benchmarks/sampling_flops.py.
"""

import argparse

from parscale_ear_hf.commands import run_script
from parscale_ear_hf.results import load_results, write_results
from research.benchmarks import sampling_flops


def main(args: argparse.Namespace) -> None:
    if args.measure:
        output = args.output or "results/sampling_speed_gpu.json"
        record = sampling_flops.measure(args, previous=load_results(output), save=lambda r: write_results(output, r))
        write_results(output, record)
        return
    record = write_results(args.output or "results/sampling_flops.json", sampling_flops.count(args))
    print(sampling_flops.flops_table(record))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(sampling_flops.add_arguments(parser), main)

"""Speed and memory of every part and of the whole pipeline, beside the baselines, in one run.

CPU (fp32):  python examples/benchmark.py                       -> results/benchmark_cpu.{json,md,png}
GPU (bf16):  bash examples/bench_gpu.sh                          -> results/benchmark_gpu.{json,md,png}
One part:    python examples/benchmark.py --sections heads vae   (merged into the existing JSON)

Then `python examples/update_readme.py` puts the tables in the README's Performance section.
"""

import argparse

from parscale_ear_hf.benchmark import add_arguments, run
from parscale_ear_hf.cli import run_script

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)

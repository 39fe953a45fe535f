"""Speed and memory of every part and of the whole pipeline, beside the baselines, in one run.

CPU (fp32):  python examples/benchmark.py                       -> results/benchmark_cpu.{json,md,png}
GPU (bf16):  bash examples/bench_gpu.sh                          -> results/benchmark_gpu.{json,md,png}
One part:    python examples/benchmark.py --sections heads vae   (merged into the existing JSON)
Sampling:    python examples/benchmark.py --sections reference cache --reference-code DIR   (DIR: the authors'
             EAR outside this repo; pip install --no-deps timm==1.0.31), then --sections quality (hours on CPU)
             -> also results/benchmark_<profile>_sampling.{md,png} and results/sampling_quality/*.json
GPU smoke:   bash examples/gpu_smoke.sh (the fast-sampling checks on one NVIDIA GPU, under 5 minutes)

Then `python examples/update_readme.py` puts the tables in docs/benchmarks.md.
"""

import argparse

from parscale_ear_hf.commands import run_script
from research.benchmarks.benchmark import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_script(add_arguments(parser), run)

#!/usr/bin/env bash
# The whole benchmark on one NVIDIA GPU: bf16 weights, CUDA-event timing, ImageNet-256 default
# configs everywhere (profile "gpu"), then the README tables. Sized to finish in under 6 minutes
# on an H100. Usage: bash examples/bench_gpu.sh [--compile]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY examples/benchmark.py --device cuda --profile gpu --repeats 5 --budget-s 20 --output results/benchmark_gpu.json "$@"
$PY examples/update_readme.py

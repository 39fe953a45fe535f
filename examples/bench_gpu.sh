#!/usr/bin/env bash
# The whole benchmark on one NVIDIA GPU: bf16 weights, CUDA-event timing, ImageNet-256 default
# configs everywhere (profile "gpu"), then the README's and docs/' tables. Sized to finish in under 6 minutes
# on an H100. Usage: bash examples/bench_gpu.sh [--compile]
#
# BENCH_DEVICE=cpu runs the same steps on a CPU at tiny sizes (`--tiny`), to check the script, not to measure
# anything: the results and copies of README.md and docs/ go to $BENCH_OUT (default /tmp/bench_gpu_cpu), never to results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
if [ "$BENCH_DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  RESULTS=results PAGES=. SIZE=() FLOPS_SIZE=()
else
  BENCH_OUT=${BENCH_OUT:-/tmp/bench_gpu_cpu}
  rm -rf "$BENCH_OUT" && mkdir -p "$BENCH_OUT"
  cp -r results docs README.md "$BENCH_OUT/"
  RESULTS=$BENCH_OUT/results PAGES=$BENCH_OUT SIZE=(--tiny --no-memory-probe)
  FLOPS_SIZE=(--tiny --steps 4 --batches 1 2 --repeats 1)
fi
$PY examples/benchmark.py --device "$BENCH_DEVICE" --profile gpu "${SIZE[@]}" --repeats 5 --budget-s 20 \
  --output "$RESULTS/benchmark_gpu.json" "$@"
# The rows of results/sampling_flops.json (computed), measured: EAR-B/L/H, P = 1, 2, 64 and 16 steps, exact and
# cached, seconds per image end to end at batches 1, 16, 64 (a row's larger batches skipped past 10 s a call).
# No row starts after FLOPS_BUDGET_S seconds (default 120, so that this script and gpu_smoke.sh fit a 15-minute
# loan with its start); the file names the rows left, and the next run on the same GPU model measures them.
$PY examples/sampling_flops.py --measure --device "$BENCH_DEVICE" "${FLOPS_SIZE[@]}" \
  --total-budget-s "${FLOPS_BUDGET_S:-120}" --output "$RESULTS/sampling_speed_gpu.json"
$PY examples/update_readme.py --root "$PAGES" --results-dir "$RESULTS"

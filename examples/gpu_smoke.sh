#!/usr/bin/env bash
# The fast-sampling issue's smoke test on one NVIDIA GPU, sized for under 5 minutes on an H100:
#   1. 50 training steps of the demo generator in bf16 (train_ear.py --mixed-precision bf16);
#   2. sampling exact, cached and compiled, and the GPU profile of the sampling benchmark
#      (benchmark.py --device cuda --profile gpu --sections cache [reference]);
#   3. a 200-sample evaluation of the demo model (demo-FID: the FID Inception weights, ~90 MB, are
#      not carried to a machine without network).
# Each step writes a JSON naming the device under $OUT_DIR (default results/gpu_smoke); a failed step
# fails the script. Needs the demo latents ($LATENTS, default runs/demo_latents: bash examples/train_demo.sh
# latents) and the demo data ($DATA, default data/mnist_demo: ... data); on a machine without network, the wheels of `bash examples/gpu_wheels.sh` in .whl/, and
# for the reference comparison a copy of the authors' EAR code in .ear_ref/ (never committed).
# With the device tool: command "bash examples/gpu_smoke.sh", carry [".whl", ".ear_ref", "runs/demo_latents",
# "data/mnist_demo"]; the JSON files come back through $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${OUT_DIR:-results/gpu_smoke}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT_DIR"
LATENTS=${LATENTS:-runs/demo_latents}
DATA=${DATA:-data/mnist_demo}
# SMOKE_DEVICE=cpu runs the same commands on a CPU at small sizes (to check the script, not to measure anything;
# `make rehearsal` does).
SMOKE_DEVICE=${SMOKE_DEVICE:-cuda}
BENCH_SIZE=()
if [ "$SMOKE_DEVICE" = cuda ]; then
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  MIXED=bf16 STEPS=50 SAMPLES=200
else
  DEVICE="cpu: $(lscpu | sed -n 's/^Model name: *//p')"
  MIXED=bf16 STEPS=4 SAMPLES=20
  BENCH_SIZE=(--sampling-configs demo --sampling-batches 2 --sampling-steps 4)
fi
echo "device: $DEVICE"
REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

# 1. Training: 50 bf16 steps from scratch, with the demo generator's architecture.
rm -rf /tmp/gpu_smoke_train
start=$(date +%s.%N)
$PY examples/train_ear.py --latents "$LATENTS" --model-config examples/configs/mnist_demo_generator.json \
  --output-dir /tmp/gpu_smoke_train --max-steps "$STEPS" --batch-size 64 --lr 1e-3 --warmup-steps 2 \
  --mixed-precision "$MIXED" --checkpoint-every "$STEPS" --sample-every 0 --seed 0 \
  $([ "$SMOKE_DEVICE" = cpu ] && echo --cpu)
end=$(date +%s.%N)
$PY - "$OUT_DIR/train_bf16.json" "$DEVICE" "$REV" "$start" "$end" <<'PY'
import json, sys
out, device, rev, start, end = sys.argv[1:]
log = [json.loads(line) for line in open("/tmp/gpu_smoke_train/train_log.jsonl")]
json.dump({"what": "training steps of the demo generator in bf16", "device": device, "git_revision": rev,
           "seconds": float(end) - float(start), "steps": log[-1]["step"], "first_loss": log[0]["loss"],
           "last_loss": log[-1]["loss"]}, open(out, "w"), indent=2)
PY

# 2. Sampling exact, cached and compiled, timed by the benchmark (bf16 weights, CUDA events).
SECTIONS=(cache) REFERENCE=()
if [ -f .ear_ref/models/ear.py ]; then SECTIONS+=(reference) REFERENCE=(--reference-code .ear_ref); fi
$PY examples/benchmark.py --device "$SMOKE_DEVICE" --profile gpu --sections "${SECTIONS[@]}" "${REFERENCE[@]}" "${BENCH_SIZE[@]}" \
  --repeats 3 --budget-s 10 --output "$OUT_DIR/benchmark_sampling_gpu.json"

# 3. A 200-sample evaluation (20 per class; on a CPU 20) of the shipped demo model, exact and cached.
for mode in exact cached; do
  flags=()
  [ $mode = cached ] && flags=(--token-cache --condition-cache)
  rm -rf "/tmp/gpu_smoke_eval_$mode"
  $PY examples/eval_fid.py --model models/mnist_demo --num-samples "$SAMPLES" --batch-size 100 --steps 16 \
    --extractor digit --classifier models/digit_classifier --dataset "$DATA" --split heldout \
    --reference-cache-dir /tmp/gpu_smoke_refs --output-dir "/tmp/gpu_smoke_eval_$mode" "${flags[@]}" \
    $([ "$SMOKE_DEVICE" = cpu ] && echo --cpu) --results-file "$OUT_DIR/eval_${SAMPLES}_$mode.json"
done
if [ -n "${OUT:-}" ] && [ "$OUT" != "$OUT_DIR" ]; then cp "$OUT_DIR"/*.json "$OUT"/; fi
echo "gpu smoke passed on $DEVICE: results in $OUT_DIR"

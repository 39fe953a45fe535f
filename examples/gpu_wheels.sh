#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that a GPU machine without network lacks for
# examples/gpu_smoke.sh (its image has torch, accelerate, transformers, safetensors, scipy, matplotlib,
# tqdm, pandas and pyarrow; not diffusers or datasets). Writes .whl/ (git-ignored).
# Usage: bash examples/gpu_wheels.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# The versions this checkout is tested with (the local virtual environment's), and the pure-Python needs.
PIN() { .venv/bin/python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
for pkg in diffusers datasets huggingface_hub dill multiprocess importlib_metadata xxhash; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$(PIN "$pkg")"
done
ls -1 .whl

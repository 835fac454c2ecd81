# sdexplore: two commands on a fresh machine.
#   make lab    set up .venv and open the tutorial notebooks in JupyterLab (embedded model, offline, CPU)
#   make test   set up .venv and run the whole test suite (what CI runs)
# Users with a GPU: install your CUDA build of torch into .venv first (see README), or pass TORCH=...

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0: on the project's CI machines pip takes a CPU build that lies on disk. Override for your machine.
TORCH ?= torch==2.13.0
PORT ?= 8888
# pytest-xdist workers for make test: one per core of the 2-core CI machines (each test runs one torch thread)
WORKERS ?= 2
# Jupyter refuses to run as root without this flag (containers, CI boxes); ordinary users never need it.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test test-fast lint bench bench-gpu docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,notebooks,docs]"
	# the tests' reference maps (tests/test_attention_map_diffusers.py); its own requirements would replace torch
	$(BIN)/python -m pip install --quiet --no-deps "attention-map-diffusers==1.0.0"
	touch $@

setup: $(VENV)/.installed

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) $(LAB_FLAGS)

# the docs site is built once per run (into build/site, reused while its inputs are unchanged; tests/conftest.py),
# and its executed tutorials serve the notebook tests too
test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(WORKERS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/run.py

bench-gpu: setup
	$(BIN)/python benchmarks/run.py --gpu

# the documentation site into site/ (offline; tutorials executed on the embedded model; warnings are errors)
docs: setup
	$(BIN)/python scripts/build_docs.py --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site build/site docs/generated

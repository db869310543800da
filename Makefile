# Quick start: `make run` (set up + the routing-collapse study, quick preset), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run train test bench context-rot

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The main job: the routing-collapse study's quick preset. A second `make run` reuses finished runs.
run: setup
	$(BIN)/python -m experiments.routing_collapse --preset quick --out runs/routing_collapse_quick --jobs 2

# The context-rot study's quick preset (trains its retrieval models, then every evaluation; committed figures).
context-rot: setup
	$(BIN)/python -m experiments.context_rot --preset quick --out runs/context_rot_quick --jobs 2

# --resume makes a second `make train` continue (or just report) the same run instead of refusing it.
train: setup
	$(BIN)/python -m research.train --config tiny --out runs/tiny --resume

# The tests also check the Hugging Face interop against transformers, so they install the `hf` and
# `interop` extras, pinned like `bench` (torch 2.13.0 is the CPU build in /opt/wheels; any other version
# makes pip download a multi-GB CUDA build).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,hf,interop]" "torch==2.13.0" "transformers==5.23.0"
	touch $@

# Two workers, one test file each at a time (module fixtures are built once): the suite's compiles are
# single-threaded, so both cores stay busy.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n 2 --dist loadfile

# Benchmarks compare against Hugging Face transformers on PyTorch CPU (the `hf` extra), pinned to the
# versions the README's numbers were measured with; torch 2.13.0 here is the CPU build.
bench: setup
	$(BIN)/pip install --quiet "torch==2.13.0" "transformers==5.23.0"
	$(BIN)/python -m experiments.benchmark_train

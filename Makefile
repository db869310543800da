# Quick start: `make run` (set up + train the tiny preset + print a sample), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# --resume makes a second `make run` continue (or just report) the same run instead of refusing it.
run: setup
	$(BIN)/python -m research.train --config tiny --out runs/tiny --resume

# The tests also check the Hugging Face interop against transformers, so they install the `hf` and
# `interop` extras, pinned like `bench` (torch 2.13.0 is the CPU build in /opt/wheels; any other version
# makes pip download a multi-GB CUDA build).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,hf,interop]" "torch==2.13.0" "transformers==5.23.0"
	touch $@

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# Benchmarks compare against Hugging Face transformers on PyTorch CPU (the `hf` extra), pinned to the
# versions the README's numbers were measured with; torch 2.13.0 here is the CPU build.
bench: setup
	$(BIN)/pip install --quiet "torch==2.13.0" "transformers==5.23.0"
	$(BIN)/python -m experiments.benchmark_train

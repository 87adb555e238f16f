# Lockstep — every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP     := $(VENV)/.installed-dev

.PHONY: run test lint bench protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(RUNTIME_STAMP)

## run: plan the example deployment on the embedded default topology
run: $(RUNTIME_STAMP)
	$(BIN)/lpuctl plan -f manifests/examples/tiny-llama.yaml --svg rack-map.svg
	@echo "rack map written to rack-map.svg"
	$(BIN)/python -m bench.executor --text-only

## test: ruff, the import-linter layer contracts, mypy on the pure core, pytest
test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

## bench: every benchmark, each run as a module (`python -m bench.NAME`)
bench: $(RUNTIME_STAMP)
	$(BIN)/python -m bench.placement
	$(BIN)/python -m bench.shard_load
	$(BIN)/python -m bench.lockstep
	$(BIN)/python -m bench.executor
	$(BIN)/python -m bench.control_plane

## protos: regenerate protos/*_pb2*.py with the pinned grpcio-tools (a test fails when stale)
protos: $(DEV_STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

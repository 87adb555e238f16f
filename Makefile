# Lockstep — every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP     := $(VENV)/.installed-dev

.PHONY: run test lint bench report plots protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(RUNTIME_STAMP)

## run: the whole system on one machine — an embedded control plane with 6 node agents (mTLS),
## the tiny-llama example applied, loaded and served, then torn down (every process stopped)
RUN_STATE := $(CURDIR)/.lockstep-run
LPUCTL    := LOCKSTEP_HOME=$(RUN_STATE) $(BIN)/lpuctl
run: $(RUNTIME_STAMP)
	@$(LPUCTL) down >/dev/null 2>&1 || true; rm -rf $(RUN_STATE)
	@trap '$(LPUCTL) down' EXIT; set -e; \
	$(LPUCTL) up; \
	$(LPUCTL) apply -f manifests/examples/tiny-llama.yaml --wait; \
	$(LPUCTL) get deployments; \
	$(LPUCTL) get nodes; \
	$(LPUCTL) describe deployment tiny-llama; \
	echo '$$ lpuctl generate tiny-llama "Once upon a time" --max-tokens 16'; \
	$(LPUCTL) generate tiny-llama "Once upon a time" --max-tokens 16

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
	$(BIN)/python -m bench.verify
	$(BIN)/python -m bench.failover

## report: run the benchmarks behind the report's figures (several minutes), save their JSON under
## docs/data/ and draw the PNGs under docs/ (BENCHMARKS.md); `make plots` redraws from the JSON only
REPORT_STAMP := $(VENV)/.installed-report
$(REPORT_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[report]'
	touch $@ $(RUNTIME_STAMP)

report: $(REPORT_STAMP)
	$(BIN)/python -m bench.report run

plots: $(REPORT_STAMP)
	$(BIN)/python -m bench.report plot

## protos: regenerate protos/*_pb2*.py with the pinned grpcio-tools (a test fails when stale)
protos: $(DEV_STAMP)
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .lockstep-run

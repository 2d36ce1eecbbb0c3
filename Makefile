# Courier: the commands README.md documents. `make run` starts everything, `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test pytest lint typecheck broker schemas bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

## run: set up, make sure a broker answers (start a local one if installed), run all services
run: $(STAMP)
	$(BIN)/python scripts/ensure_broker.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/honcho start -f Procfile

## test: everything CI checks: lint, strict typing, the whole test suite against a real broker
test: lint typecheck pytest

pytest: $(STAMP)
	$(BIN)/python scripts/ensure_broker.py --optional
	$(BIN)/pytest -n 4 --dist loadscope

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

broker:
	$(PYTHON) scripts/ensure_broker.py

## schemas: regenerate contracts/schemas/*.json and contracts/asyncapi.yaml from the models
# `python -m` imports the contracts of this checkout; the `courier-schemas` script imports the ones
# the environment was installed from, another checkout when worktrees share one .venv.
schemas: $(STAMP)
	$(BIN)/python -m contracts.export

## bench: benchmarks with same-run baselines (never part of the test run); figures in bench/results/
bench: $(STAMP)
	$(BIN)/python scripts/ensure_broker.py
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.batch
	$(BIN)/python -m bench.e2e_latency
	$(BIN)/python -m bench.consumer
	$(BIN)/python -m bench.replay
	$(BIN)/python -m bench.dlq_drain
	$(BIN)/python -m bench.dlq_store
	$(BIN)/python -m bench.upload_memory
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.table

## lock: re-resolve requirements.lock from pyproject.toml (needs uv)
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

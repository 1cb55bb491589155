# Lethe developer commands. `make test` and `make run` work on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint typecheck run bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The whole suite: engine, store, API, worker and end-to-end, on SQLite and on PostgreSQL + Redis.
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check engine models_store app worker tests

typecheck: $(STAMP)
	$(BIN)/mypy

## Embedded deployment: SQLite, SQL broker, one worker, API on 127.0.0.1:8000.
run: $(STAMP)
	$(BIN)/lethe serve

bench: $(STAMP)
	$(BIN)/lethe bench --dataset mnist5k --scenario all --seeds 3 --methods all --ablation --json var/bench.json

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

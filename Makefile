# Two commands on a fresh machine: `make serve` and `make test`. Both are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m-instruct

.PHONY: setup serve test test-optional bench bench-paging soak

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/python -m models.fetch $(MODEL)

serve: setup
	$(BIN)/python -m server --model $(MODEL) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

test-optional: setup
	$(BIN)/python -m pytest -q -m optional tests

bench: setup
	$(BIN)/python bench/bench.py

bench-paging: setup
	$(BIN)/python bench/paging.py

soak: setup
	$(BIN)/python bench/soak.py --clients 128 --seconds 600

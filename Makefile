# One virtual environment in .venv holds the package and, for tests and benchmarks, its test extra.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is

.PHONY: install install-test run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## run: set up, fetch the default model (once), and generate from it
run: install
	$(BIN)/appliance generate "$(PROMPT)"

## test: lint, then the whole test suite (fetches the default model once)
test: install-test lint
	$(BIN)/appliance-ctl models fetch
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## bench: load time, memory, prefill and decode tokens/s beside transformers, in one run
bench: install-test
	$(BIN)/appliance bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

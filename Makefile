# `make serve` and `make test` work on a fresh machine: both install first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a GPU machine: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint bench soak clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

serve: install
	$(BIN)/diffuser-api serve

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/previews.py
	$(BIN)/python bench/models.py

soak: install
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache

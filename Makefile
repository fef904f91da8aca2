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

# The Node examples need the openai npm package (tests/integration/test_examples.py runs them).
test: examples/node_modules
examples/node_modules: examples/package.json examples/package-lock.json
	npm ci --prefix examples --no-audit --no-fund
	touch $@

# The browser tests (playground, /docs) drive Debian's chromium: Playwright's own browser
# download is not reachable from CI. Installed only when missing (CI runs as root).
.PHONY: test-deps-chromium
test: test-deps-chromium
test-deps-chromium:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)

# The jobs tests start a throwaway PostgreSQL (Debian's package) as the postgres user.
.PHONY: test-deps-postgresql
test: test-deps-postgresql
test-deps-postgresql:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update && apt-get install -y --no-install-recommends postgresql)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench examples

bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/previews.py
	$(BIN)/python bench/models.py
	$(BIN)/python bench/loras.py
	$(BIN)/python bench/speed.py
	$(BIN)/python bench/jobs.py
	$(BIN)/python bench/batches.py
	$(BIN)/python bench/ray.py

soak: install
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache

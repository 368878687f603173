# Two entry points that work on a fresh machine with only Python 3.11: `make demo` and `make test`.
# Each creates .venv and installs what it needs (torch from the local CPU wheel first, then the rest pinned
# against constraints.txt so that pip cannot swap in a CUDA torch).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-long lint bench-ingest bench-ops clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# the browser tests drive Debian's chromium with Playwright (never `playwright install`: no download); only root
	# can install it, anyone else gets the browser tests skipped with a reason
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "chromium is not installed (needs root): the browser tests will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raysvc demo

test: $(STAMP)
	$(BIN)/ruff check raysvc tests
	$(BIN)/ruff format --check raysvc tests
	$(BIN)/python -m pytest -q -m "not long" --durations=30

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not long"

test-long: $(STAMP)
	$(BIN)/python -m pytest -q -m long

lint: $(STAMP)
	$(BIN)/ruff check raysvc tests
	$(BIN)/ruff format --check raysvc tests

bench-ingest: $(STAMP)
	$(BIN)/raysvc bench ingest --json --events 2000 --shard-events 250 --out runs/bench-ingest.json

bench-ops: $(STAMP)
	$(BIN)/raysvc bench ops --json --out runs/bench-ops.json

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two entry points (see README): `make demo` and `make test`.
# Both create ./.venv on first use, installing the CPU build of torch first
# so that pip never pulls the multi-gigabyte CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(or $(LLBCFL_DATA),./data)

.PHONY: venv demo test test-fast lint clean

$(BIN)/llbcfl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(BIN)/llbcfl

demo: venv
	$(BIN)/python cli.py data fetch --data-dir $(DATA)
	rm -rf out/demo-run
	$(BIN)/python cli.py network up --data-dir $(DATA) --miners 4 --client-procs 2 \
		--clients 20 --frac 0.5 --rounds 5 --run-dir out/demo-run --metrics-out out/demo.json
	$(BIN)/python cli.py chain verify --db out/demo-run/miner-0/chain.db \
		--genesis out/demo-run/genesis.toml
	$(BIN)/python cli.py plot out/demo.json --out out/demo.png

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The developers' loop (under 5 minutes): no end-to-end network runs, no slow audits.
test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

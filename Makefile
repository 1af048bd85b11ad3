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

# Gaussian local DP at epsilon = 10 per client, three clients out of twenty
# sending noise; the run ends with a summary (accuracy, privacy spent, each
# attacker's rejections, every miner's chain verified) and the figure.
# DEMO_OPTS: more `network up` options, e.g. DEMO_OPTS='--rounds 10'.
DEMO_OPTS ?=
demo: venv
	$(BIN)/python cli.py data fetch --data-dir $(DATA)
	rm -rf out/demo-run
	$(BIN)/python cli.py network up --data-dir $(DATA) --miners 4 --client-procs 2 \
		--clients 20 --frac 0.5 --rounds 5 --dp gaussian --epsilon 10 \
		--malicious 0.15 --attack noise $(DEMO_OPTS) \
		--run-dir out/demo-run --metrics-out out/demo.json --plot out/demo.png

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The developers' loop (under 5 minutes): no end-to-end network runs, no attacks on
# live networks, no slow audits.
test-fast: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not e2e and not adversarial"

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

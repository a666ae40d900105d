# `make test` alone sets up a fresh machine: a virtual environment, a pinned CPU build of torch
# (where no NVIDIA GPU is present), streamprune with its test extra, then the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this release installs without pulling several GB of CUDA libraries.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	else $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python bench/demo.py

bench: install
	$(BIN)/python bench/speed.py --device cpu
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

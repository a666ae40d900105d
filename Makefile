# `make test` alone sets up a fresh machine: a virtual environment, a pinned CPU build of torch
# (where no NVIDIA GPU is present), streamprune with its test extra, then the suite. The small
# language model of the demo and the quality tests ships in bench/tinylm-v2 (`make fixture-train`
# trains it here from the same recipe and says whether it is the same model).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without an NVIDIA GPU, this release's CPU wheel from PyTorch's CPU index (a few hundred MB; PyPI's Linux wheel
# pulls several GB of CUDA libraries); where that index cannot be reached (an offline machine with its own
# package source), pip's configured sources.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed
# The suite runs on one thread (subprocesses inherit it): on two cores it then takes as long with
# another process keeping one core busy as without, where one thread per core slows down by ~40%.
TEST_THREADS ?= 1

.PHONY: install fixture-train fixture-moe test test-fast test-kernels demo bench bench-moe bench-experts bench-sweep bench-high-sparsity clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	elif $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; \
	then $(BIN)/python -m pip install -q "$(TORCH_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; \
	else $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# bench/tinylm.py --train: trains the demo model on this machine (one thread, about 7 minutes; then cached), prints
# its figures and whether it is the shipped bench/tinylm-v2 byte for byte.
fixture-train: install
	$(BIN)/python bench/tinylm.py --train

# The Mixtral-shaped bench model (8 experts, top-2; trained once on one thread, then cached). No test needs it.
fixture-moe: install
	$(BIN)/python bench/tinylm.py --moe

# -v names each test as it starts, so a long one shows what it is doing.
test: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -v --durations=5

# Everything but the tests marked slow (those that prune the demo model).
test-fast: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -m "not slow"

# The comparison-heavy tests with torch's CPU kernels forced to each vector width this machine runs (default, avx2 below
# avx512, its own), on 1 and 2 threads: a tolerance that holds only where both sides round alike shows here.
KERNEL_TESTS := tests/test_tasks.py tests/test_parity.py tests/test_pipeline_parity.py tests/test_fp8.py tests/test_mxfp4.py
test-kernels: install
	@caps="default $$($(BIN)/python -c 'import torch; c = torch.backends.cpu.get_cpu_capability().lower(); print("avx2 " + c if c == "avx512" else c)')"; \
	for cap in $$caps; do for threads in 1 2; do \
		echo "== ATEN_CPU_CAPABILITY=$$cap, $$threads thread(s)"; \
		ATEN_CPU_CAPABILITY=$$cap OMP_NUM_THREADS=$$threads $(BIN)/python -m pytest -q $(KERNEL_TESTS) || exit 1; \
	done; done

demo: install
	$(BIN)/python bench/demo.py

bench: install
	$(BIN)/python bench/speed.py --device cpu
	$(BIN)/python bench/memory.py

# --moe-calibration routed against all, and SparseGPT's expert errors against magnitude's, on the MoE fixture.
bench-moe: fixture-moe
	OMP_NUM_THREADS=1 $(BIN)/python bench/moe_calibration.py

# Removing 25% and 50% of the experts of the MoE fixture by each --expert-criterion; REAP with SparseGPT and 4 bits.
bench-experts: fixture-moe
	OMP_NUM_THREADS=1 $(BIN)/python bench/expert_pruning.py

# The bench model's perplexity curve (docs/commands.md, the sweep): `streamprune sweep` of 3 methods x 9 levels + 2:4
# against the 30 separate runs and evals; writes bench/results/sweep.md and sweep.png.
bench-sweep: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/sweep.py --out bench/results

# Every method, uniform and with OWL, at 50/60/70% and 2:4 on the bench model (docs/methods.md).
bench-high-sparsity: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/high_sparsity.py --out bench/results/high_sparsity.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

#!/usr/bin/env bash
# GPU checks and benchmarks in one call, a few minutes on one H100 (step 4 only on a node with several GPUs):
#   1. the CUDA path against the CPU path on small random checkpoints (bench/cuda_parity.py), then the test
#      suite's GPU tests (attention on fused kernels, GPU peaks against the plan: tests/test_gpu.py);
#   2. bench/speed.py on an OPT-175B-shaped block and on a LLaMA-70B-shaped block, with the
#      extrapolated whole-model time; then SparseGPT and ADMM (its default final solve, then the exact one) on the
#      CPU bench's block shape;
#   3. bench/solve_memory.py on OPT-175B's down projection (12288 x 49152, fp16) under a 24 GB cap:
#      the measured GPU peak of its solve against the planner's, with and without X^T X in host memory.
# `bench/gpu_check.sh --dry-run` runs the same steps on the CPU with tiny shapes (what CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
  "$PY" bench/cuda_parity.py --device cpu
  "$PY" bench/speed.py --dry-run --device cpu
  "$PY" bench/speed.py --dry-run --device cpu --method admm
  "$PY" bench/speed.py --dry-run --device cpu --method admm --admm-solve exact
  "$PY" bench/solve_memory.py --device cpu --rows 64 --cols 256
  "$PY" bench/dist_speed.py --dry-run
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" bench/cuda_parity.py --device cuda
"$PY" -m pytest -q -m gpu tests/
"$PY" bench/speed.py --device cuda --shape opt-175b --blocks 1 --json "${OUT:-.}/speed_opt175b.json"
"$PY" bench/speed.py --device cuda --shape llama-70b --blocks 1 --json "${OUT:-.}/speed_llama70b.json"
# 2b. ADMM's solve against SparseGPT's on the CPU bench's block shape (the solve phase's 3x target), then ADMM with
#     the exact solve of the final mask
"$PY" bench/speed.py --device cuda --shape mid --method sparsegpt --json "${OUT:-.}/speed_mid_sparsegpt.json"
"$PY" bench/speed.py --device cuda --shape mid --method admm --json "${OUT:-.}/speed_mid_admm.json"
"$PY" bench/speed.py --device cuda --shape mid --method admm --admm-solve exact --json "${OUT:-.}/speed_mid_admm_exact.json"
"$PY" bench/solve_memory.py --device cuda --rows 12288 --cols 49152 --dtype fp16 --tokens 65536 --budget 24GB
# 4. several GPUs: the same pass with 1, 2, ... ranks, one per GPU (torchrun, NCCL), on a hidden-2048 block:
#    python -m torch.distributed.run --standalone --nproc-per-node N -m streamprune run ... for each N
NGPU=$(nvidia-smi -L | wc -l)
if [ "$NGPU" -gt 1 ]; then
  "$PY" bench/dist_speed.py --device cuda --shape mid --nproc "$(seq -s, 1 "$NGPU" | sed 's/,$//')"
fi

"""Peak memory of pruning one linear (accumulate X^T X, solve, score, free), measured against the planner.

The planner (streamprune/plan.py, `Footprint.solve_peak`) predicts what the solve of the largest
linear adds on the compute device: X^T X, the solver's matrix (SparseGPT's inverse factor, built in
place), the linear's temporaries and its pruned copy; with the X^T X offload, X^T X waits in host
memory instead. This script runs that lifecycle on one random linear per case, in a fresh process
each, and prints the measured peak next to the prediction. On the CPU the measured figure is the
process's peak RSS above its starting point (device and host are the same memory); on CUDA it is
`torch.cuda.max_memory_allocated` above the starting point, under a per-process memory cap when
`--budget` is given (so an over-budget run fails instead of borrowing the rest of the card).

    python bench/solve_memory.py                                      # 2048 x 8192, CPU
    python bench/solve_memory.py --device cuda --rows 12288 --cols 49152 --budget 24GB   # OPT-175B fc2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import add_record_option, recording  # noqa: E402
from streamprune.memory import (
    allocate_large_buffers_with_mmap,
    parse_size,
    release_freed_memory,
)
from streamprune.pruners import METHODS, Grid, Pattern, make_pruner

CASES = [("sparsegpt", False), ("sparsegpt", True), ("wanda", False), ("wanda", True), ("magnitude", False)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def predicted(method: str, offload: bool, rows: int, cols: int, itemsize: int,
              grid: Grid | None = None) -> tuple[int, int]:
    """(compute-device bytes, host bytes) the planner adds for this linear's solve (see Footprint.solve_peak); with a
    grid, the weight before rounding is held for the errors (Footprint.site_unrounded, a site of one linear)."""
    hessian = cols * cols * 4
    cls = METHODS[method]
    device = (hessian * (1 + cls.solver_matrices) + cls.workspace(rows, cols, cols, {}, grid) + rows * cols * itemsize
              + (4 * rows * cols if grid else 0))
    return device - (hessian if offload else 0), hessian if offload else 0


def one_case(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    allocate_large_buffers_with_mmap()
    if device.type == "cuda" and args.budget:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget / torch.cuda.get_device_properties(device).total_memory))
    g = torch.Generator(device).manual_seed(0)
    weight = torch.randn(args.rows, args.cols, generator=g, device=device).to(DTYPES[args.dtype])
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart VmHWM from the current RSS
    base_rss = status_kib("VmRSS")
    start = time.perf_counter()
    grid = None if args.wbits is None else Grid(args.wbits, args.group_size, False)
    p = make_pruner(args.method, args.cols, device, 0.5, Pattern(), offload_hessian=args.offload, errors=True, grid=grid)
    for _ in range(0, args.tokens, args.batch_tokens):
        x = torch.randn(args.batch_tokens, args.cols, generator=g, device=device)
        p.add_batch(x)
        del x
    result = p.prune(weight)
    pruned = result.weight.to(weight.dtype, memory_format=torch.contiguous_format)
    unrounded = result.unrounded
    del result  # as the pipeline does: the codes go, the weight before rounding stays for the errors
    p.release_solver()
    err = p.reconstruction_error(weight, pruned)
    if unrounded is not None:
        p.split_errors(weight, unrounded, pruned)
        del unrounded
    p.free()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"rss": (status_kib("VmHWM") - base_rss) * 1024, "seconds": seconds, "rel_error": err}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.max_memory_allocated() - base_dev
    return out


def every_case(args: argparse.Namespace) -> None:
    """Run each case in a fresh process and print its row beside the prediction."""
    itemsize = DTYPES[args.dtype].itemsize
    on_gpu = args.device.startswith("cuda")
    print(f"one linear {args.rows} x {args.cols} ({args.dtype}), {args.tokens} tokens; device {args.device}"
          + (f", capped at {args.budget / 2**30:.1f} GiB" if args.budget else ""))
    if args.wbits:
        print(f"quantized: {args.wbits} bits, group size {args.group_size}, asymmetric")
    print(f"X^T X {args.cols**2 * 4 / 2**20:,.0f} MiB; weight {args.rows * args.cols * itemsize / 2**20:,.0f} MiB as stored")
    head = "GPU MiB  plan GPU  RSS MiB  plan host" if on_gpu else "RSS MiB  plan MiB"
    print(f"{'method':10} {'offload':>7}  {head}  ratio  seconds  rel.error")
    for method, offload in CASES:
        cmd = [sys.executable, __file__, "--one", "--method", method, "--device", args.device, "--rows", str(args.rows),
               "--cols", str(args.cols), "--dtype", args.dtype, "--tokens", str(args.tokens),
               "--batch-tokens", str(args.batch_tokens)] + (["--offload"] if offload else [])
        if args.wbits:
            cmd += ["--wbits", str(args.wbits), "--group-size", str(args.group_size)]
        if args.budget:
            cmd += ["--budget", str(args.budget)]
        run = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if run.returncode:
            print(f"{method:10} {offload!s:>7}  failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(run.stdout)
        grid = None if args.wbits is None else Grid(args.wbits, args.group_size, False)
        dev, host = predicted(method, offload, args.rows, args.cols, itemsize, grid)
        if on_gpu:
            cells = f"{r['gpu'] / 2**20:7,.0f} {dev / 2**20:9,.0f} {r['rss'] / 2**20:8,.0f} {host / 2**20:10,.0f}"
            ratio = dev / r["gpu"]
        else:
            cells = f"{r['rss'] / 2**20:7,.0f} {(dev + host) / 2**20:9,.0f}"
            ratio = (dev + host) / r["rss"]
        print(f"{method:10} {offload!s:>7}  {cells}  {ratio:5.2f}  {r['seconds']:7.1f}  {r['rel_error']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: 2 x cols)")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--budget", type=parse_size, default=None, help="CUDA only: cap this process's GPU memory")
    ap.add_argument("--wbits", type=int, default=None, help="quantize too (asymmetric), as --wbits does")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    add_record_option(ap)
    args = ap.parse_args()
    args.tokens = args.tokens or 2 * args.cols
    if args.one:
        print(json.dumps(one_case(args)))
        return
    with recording(ap, args):
        every_case(args)


if __name__ == "__main__":
    main()

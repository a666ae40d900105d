"""Per-phase time of one pruned block against its compute floor.

Writes a random checkpoint of the chosen block shape, prunes it with `streamprune.prune` on the
chosen device, and prints for the last block each phase's measured time, its floor (FLOPs divided
by this device's measured float32 GEMM rate) and their ratio, then the whole-model extrapolation.

    python bench/speed.py --device cpu                    # hidden 2048, ffn 8192, 32 x 512 tokens
    python bench/speed.py --device cuda --shape opt-175b  # hidden 12288, ffn 49152, 128 x 2048 tokens
    python bench/speed.py --device cuda --shape llama-70b # hidden 8192, ffn 28672, GQA 64/8
    python bench/speed.py --dry-run                       # a tiny shape, to check the script runs
    python bench/speed.py --method admm                   # ADMM (its default final solve: a few PCG steps)
    python bench/speed.py --method admm --admm-solve exact    # ADMM with the exact solve of the final mask

FLOPs counted per block, with T calibration tokens: Hessians 2*T*d^2 per distinct input width d;
forward 2*T*params plus attention 2*T*seqlen*hidden (causal half of QK^T and PV), once for the
calibration passes and once for the outputs; Cholesky and inverse d^3 per distinct input; the OBS
sweep rows*cols^2 per linear (SparseGPT); ADMM: Cholesky d^3/3 per distinct input and its inverse 2d^3/3
where the input is no wider than its first linear is tall, then per linear 2*rows*cols^2 for each W-update (a
GEMM with the inverse, or two triangular solves) and each conjugate-gradient step; the report's reconstruction
error 4*rows*cols^2 per linear. Read and write are I/O; their rate is shown instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from bench.synth import Shape, block_tensors, make_checkpoint  # noqa: E402
import streamprune  # noqa: E402
from streamprune.pruners.admm import PCG_STEPS, SOLVES as ADMM_SOLVES  # noqa: E402

SHAPES = {  # name -> (shape, nsamples, seqlen, blocks in the full model)
    "mid": (Shape("llama", 2048, 8192, 16, 16), 32, 512, 24),
    "opt-175b": (Shape("opt", 12288, 49152, 96, 96, vocab=1024), 128, 2048, 96),
    "llama-70b": (Shape("llama", 8192, 28672, 64, 8, vocab=1024), 128, 2048, 80),
    "dry": (Shape("llama", 128, 512, 4, 2, vocab=512), 4, 64, 4),
}


def gemm_rate(device: torch.device, n: int) -> float:
    """Float32 FLOP/s of an n x n matmul on `device` (best of 5)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def floors(shape: Shape, tokens: int, seqlen: int, method: str, iterations: int = 8,
           cg_steps: int = 0) -> dict[str, float]:
    """FLOPs of each compute phase for one block (ADMM: its `iterations` W-updates per linear, less the first, the
    GEMM that starts the final solve and its `cg_steps` conjugate-gradient steps: the default solve's fixed budget;
    the exact solve's steps, as many as the data need, are not counted)."""
    linears = [s for n, s in block_tensors(shape, 0).items() if n.endswith(".weight") and len(s) == 2]
    params = sum(r * c for r, c in linears)
    widths = [shape.hidden, shape.heads * shape.head_dim, shape.hidden, shape.ffn]  # distinct inputs
    tallest = [shape.heads * shape.head_dim, shape.hidden, shape.ffn, shape.hidden]  # rows of the first linear of each
    forward = 2 * tokens * params + 2 * tokens * seqlen * shape.heads * shape.head_dim
    sweep = sum(r * c * c for r, c in linears) if method == "sparsegpt" else sum(r * c for r, c in linears)
    if method == "admm":
        sweep = sum((iterations + cg_steps) * 2 * r * c * c for r, c in linears)
    chol = sum(d**3 for d in widths) if method == "sparsegpt" else 0
    if method == "admm":
        chol = sum(d**3 // 3 + (2 * d**3 // 3 if d <= rows else 0) for d, rows in zip(widths, tallest))
    return {"calibrate": forward, "hessian": sum(2 * tokens * d * d for d in widths), "solve": chol + sweep,
            "error": sum(4 * r * c * c for r, c in linears), "forward": forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--admm-iterations", type=int, default=None,
                    help="ADMM only; 1 scores the mask once (|W| scaled by the input norms), then the final solve")
    ap.add_argument("--admm-solve", choices=ADMM_SOLVES, default=None, help="ADMM only: the final solve")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=2, help="blocks in the generated checkpoint; the last is timed")
    ap.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU unless --device says otherwise")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    add_record_option(ap)
    args = ap.parse_args()
    name = "dry" if args.dry_run else args.shape
    shape, nsamples, seqlen, full_depth = SHAPES[name]
    nsamples, seqlen = args.nsamples or nsamples, args.seqlen or seqlen
    device = torch.device(args.device)
    torch.manual_seed(0)

    work = Path(tempfile.mkdtemp(prefix="streamprune-speed-", dir=args.workdir))
    try:
        model, out, calib = work / "model", work / "out", work / "calib.npy"
        make_checkpoint(model, shape, args.blocks, torch.float16)
        np.save(calib, np.random.default_rng(0).integers(0, shape.vocab, nsamples * seqlen * 2))
        rate = gemm_rate(device, 512 if name == "dry" else (8192 if device.type == "cuda" else 4096))
        knobs = {k: v for k, v in (("admm_iterations", args.admm_iterations), ("admm_solve", args.admm_solve))
                 if v is not None}
        report = streamprune.prune(model, out, method=args.method, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                   device=args.device, progress=False, **knobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    last = report.block_phases[str(args.blocks - 1)]
    cg_steps = PCG_STEPS if report.args.get("admm_solve") == "pcg" else 0
    flops = floors(shape, nsamples * seqlen, seqlen, args.method, report.args.get("admm_iterations", 8), cg_steps)
    block_bytes = sum(np.prod(s) * 2 for s in block_tensors(shape, 0).values())
    rows = []
    for phase in ("read", "calibrate", "hessian", "solve", "error", "forward", "write"):
        measured = last[phase]
        floor = flops[phase] / rate if phase in flops else None
        rows.append((phase, measured, floor))
    total = sum(m for _, m, _ in rows)
    compute_floor = sum(f for _, _, f in rows if f is not None)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    with recording(ap, args, ignore=("workdir", "json")):
        print(f"{name} block: {shape.family}, hidden {shape.hidden}, ffn {shape.ffn}, "
              f"heads {shape.heads}/{shape.kv_heads}; {nsamples} x {seqlen} tokens; {args.method}; {dev_name}; "
              f"float32 GEMM {rate / 1e12:.2f} TFLOP/s")
        print(f"{'phase':<10} {'measured s':>11} {'floor s':>9} {'ratio':>7} {'share':>6}")
        for phase, measured, floor in rows:
            ratio = f"{measured / floor:7.2f}" if floor else f"{'-':>7}"
            fl = f"{floor:9.3f}" if floor is not None else f"{'I/O':>9}"
            print(f"{phase:<10} {measured:11.3f} {fl} {ratio} {measured / total:6.1%}")
        print(f"{'block':<10} {total:11.3f} {compute_floor:9.3f} {total / compute_floor:7.2f}")
        print(f"read: {block_bytes / 2**30:.2f} GiB per block; {report.read_hidden_seconds:.2f}s of "
              f"{report.read_total_seconds:.2f}s reading hidden behind compute")
        print(f"extrapolated: {full_depth} blocks x {total:.1f}s = {full_depth * total / 60:.1f} min "
              f"(peak GPU {report.peak_gpu_bytes / 2**30:.1f} GiB, "
              f"peak RSS {report.process_peak_rss_bytes / 2**30:.1f} GiB)")
        if args.method == "admm":
            rows_last = [lr for lr in report.layers if lr.block == args.blocks - 1]
            print("admm: " + ", ".join(f"{lr.role} {lr.iterations}+{lr.cg_iterations} CG" for lr in rows_last)
                  + " iterations (last block)")
    if args.json:
        args.json.write_text(json.dumps({"shape": name, "device": dev_name, "gemm_flops": rate, "phases": [
            {"phase": p, "measured": m, "floor": f} for p, m, f in rows], "block_seconds": total,
            "floor_seconds": compute_floor, "blocks": full_depth}, indent=2))


if __name__ == "__main__":
    main()

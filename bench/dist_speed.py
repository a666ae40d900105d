"""Per-block time with N ranks, measured on this machine's CPUs, and predicted for an OPT-175B block on GPUs.

    python bench/dist_speed.py                 # measure: torchrun with N = 1 and 2 ranks, one thread each
    python bench/dist_speed.py --nproc 1,2,4   # other rank counts (each rank wants its own core)
    python bench/dist_speed.py --predict       # the scaling model for OPT-175B on 1, 2, 4, 8 GPUs (PREDICTED)
    python bench/dist_speed.py --dry-run       # a tiny shape, to check the script runs
    python bench/dist_speed.py --device cuda --shape mid --nproc 1,2,4,8   # on a GPU node (bench/gpu_check.sh)

Measured: a random checkpoint of `--blocks` blocks is pruned by `python -m torch.distributed.run --standalone
--nproc-per-node N -m streamprune run ...` (gloo, OMP_NUM_THREADS=1 per rank); the table shows rank 0's phases of
the blocks after the first, per block.

Predicted (--predict), per block: the forwards and X^T X accumulation split by windows (time / N); each stage of
SEQUENTIAL solved with its linears assigned to ranks largest first (a rank that owns a linear of a site factors that
site's X^T X itself: d^3, plus the sweep rows*cols^2 and the error 4*rows*cols^2 of its linears); X^T X of every
site all-reduced (d_in^2 float32, a ring moving 2(N-1)/N of it) and each solved linear broadcast in fp16 (its bytes);
the block read by every rank behind the read-ahead (not on the critical path). Compute at --tflops, links at --gbps
bus bandwidth: assumptions, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from bench.speed import SHAPES, floors  # noqa: E402
from bench.synth import Shape, make_checkpoint  # noqa: E402

CPU_SHAPES = {  # name -> (shape, nsamples, seqlen, blocks)
    "cpu": (Shape("llama", 1024, 2816, 8, 8, vocab=1024), 32, 256, 3),
    "dry": (Shape("llama", 128, 512, 4, 2, vocab=512), 4, 64, 3),
}
PHASES = ("calibrate", "hessian", "solve", "error", "forward", "sync", "write")


def measure(name: str, nprocs: list[int], device: str) -> None:
    shape, nsamples, seqlen, blocks = CPU_SHAPES[name] if name in CPU_SHAPES else (*SHAPES[name][:3], 3)
    work = Path(tempfile.mkdtemp(prefix="streamprune-dist-speed-"))
    try:
        model, calib = work / "model", work / "calib.npy"
        make_checkpoint(model, shape, blocks, torch.float16)
        np.save(calib, np.random.default_rng(0).integers(0, shape.vocab, nsamples * seqlen * 2))
        print(f"{name} block: {shape.family}, hidden {shape.hidden}, ffn {shape.ffn}; {nsamples} x {seqlen} tokens; "
              f"sparsegpt; {device}, one thread per rank; rank 0's phases per block (mean of blocks 1..{blocks - 1})")
        print(f"{'ranks':>5} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'block s':>8} {'speedup':>8} {'wall s':>7}")
        base = None
        for n in nprocs:
            out = work / f"out{n}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   "-m", "streamprune", "run", str(model), str(out), "--calib", str(calib), "--nsamples", str(nsamples),
                   "--seqlen", str(seqlen), "--device", device]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=env)
            report = json.loads((out / "streamprune_report.json").read_text())
            per = {p: np.mean([report["block_phases"][str(b)][p] for b in range(1, blocks)]) for p in PHASES}
            block = sum(per.values())
            base = base or block
            print(f"{n:>5} " + " ".join(f"{per[p]:9.3f}" for p in PHASES)
                  + f" {block:8.3f} {base / block:8.2f} {report['wall_seconds']:7.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def owners(sizes: list[float], n: int) -> list[int]:
    """As streamprune.dist.Ranks.owners: largest first, to the least loaded rank."""
    load, own = [0.0] * n, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(n), key=lambda r: load[r])
        own[i], load[r] = r, load[r] + sizes[i]
    return own


def predict(nprocs: list[int], tflops: float, gbps: float) -> None:
    shape, nsamples, seqlen, depth = SHAPES["opt-175b"]
    h, f = shape.hidden, shape.ffn
    # OPT's sites in SEQUENTIAL order: (input width, [(rows, cols) of each linear])
    stages = [(h, [(h, h)] * 3), (h, [(h, h)]), (h, [(f, h)]), (f, [(h, f)])]
    tokens = nsamples * seqlen
    flops = floors(shape, tokens, seqlen, "sparsegpt")
    rate, link = tflops * 1e12, gbps * 1e9
    print(f"PREDICTED, not measured: OPT-175B shape (hidden {h}, ffn {f}, {depth} blocks), {nsamples} x {seqlen} "
          f"calibration tokens, sparsegpt, float32 compute at {tflops:g} TFLOP/s per GPU, {gbps:g} GB/s bus bandwidth")
    print(f"{'GPUs':>4} {'fwd+XtX s':>10} {'solve+err s':>12} {'comm s':>7} {'block s':>8} {'model min':>10} "
          f"{'speedup':>8} {'act/rank GiB':>13}")
    base = None
    for n in nprocs:
        split = (flops["calibrate"] + flops["hessian"] + flops["forward"]) / rate / n
        solve = comm = 0.0
        for d, linears in stages:
            work = [r * c * c * 5 for r, c in linears]  # sweep + error
            own = owners(work, n)
            per_rank = [sum(w for w, o in zip(work, own) if o == r) + (d**3 if r in own else 0) for r in range(n)]
            solve += max(per_rank) / rate
            if n > 1:
                comm += 2 * (n - 1) / n * d * d * 4 / link + sum(r * c * 2 for r, c in linears) / link
        block = split + solve + comm
        base = base or block
        acts = 2 * -(-nsamples // n) * seqlen * h * 4 / 2**30
        print(f"{n:>4} {split:10.2f} {solve:12.2f} {comm:7.2f} {block:8.2f} {depth * block / 60:10.1f} "
              f"{base / block:8.2f} {acts:13.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", default=None, help="comma-separated rank counts (default 1,2; --predict: 1,2,4,8)")
    ap.add_argument("--predict", action="store_true", help="print the OPT-175B scaling model instead of measuring")
    ap.add_argument("--tflops", type=float, default=50.0, help="--predict: float32 TFLOP/s of one GPU")
    ap.add_argument("--gbps", type=float, default=200.0, help="--predict: collective bus bandwidth, GB/s")
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape")
    ap.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per rank (NCCL)")
    ap.add_argument("--shape", choices=sorted({*CPU_SHAPES, *SHAPES} - {"dry"}), default="cpu",
                    help="the measured block: cpu (hidden 1024), or one of bench/speed.py's shapes")
    add_record_option(ap)
    args = ap.parse_args()
    with recording(ap, args):
        if args.predict:
            predict([int(n) for n in (args.nproc or "1,2,4,8").split(",")], args.tflops, args.gbps)
        else:
            measure("dry" if args.dry_run else args.shape, [int(n) for n in (args.nproc or "1,2").split(",")],
                    args.device)


if __name__ == "__main__":
    main()

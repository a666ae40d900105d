"""Spot checks of the CUDA path against the CPU path on small random checkpoints.

For each family: streaming logits on DEVICE vs CPU (max abs difference), and a SparseGPT / Wanda
run on each: agreement of the pruned masks and of the output perplexity. With --device cpu the
script compares the CPU path with itself (a dry run of the script).

    python bench/cuda_parity.py --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synth import Shape, make_checkpoint  # noqa: E402
import streamprune  # noqa: E402
from streamprune.checkpoint import Checkpoint  # noqa: E402
from streamprune.evaluate import logits  # noqa: E402

SHAPES = {"llama": Shape("llama", 256, 512, 8, 2, vocab=1024), "opt": Shape("opt", 256, 1024, 8, 8, vocab=1024)}


def masks(model: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(model)
    return {n: ckpt.read(n) == 0 for n, i in ckpt.tensors.items() if len(i.shape) == 2 and ".layers." in n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streamprune-parity-"))
    failures = 0
    try:
        calib = work / "calib.npy"
        np.save(calib, np.random.default_rng(0).integers(0, 1024, 32 * 128))
        for family, shape in SHAPES.items():
            model = work / family
            make_checkpoint(model, shape, 3, torch.float32)
            ids = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
            diff = (logits(model, ids, args.device).cpu() - logits(model, ids, "cpu")).abs().max().item()
            ok = diff <= 1e-3
            failures += not ok
            print(f"{family:6} logits {args.device} vs cpu: max abs diff {diff:.2e} {'ok' if ok else 'FAIL'}")
            for method in ("sparsegpt", "wanda"):
                outs = {}
                for dev in (args.device, "cpu"):
                    outs[dev] = work / f"{family}-{method}-{dev}"
                    streamprune.prune(model, outs[dev], method=method, calib=calib, nsamples=16, seqlen=128,
                                      device=dev, blocksize=64)
                a, b = masks(outs[args.device]), masks(outs["cpu"])
                agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
                ppl = [streamprune.evaluate(outs[d], calib, seqlen=128, device="cpu").perplexity
                       for d in (args.device, "cpu")]
                rel = abs(ppl[0] / ppl[1] - 1)
                ok = agree >= 0.99 and rel <= 0.01
                failures += not ok
                print(f"{family:6} {method:9} masks agree {agree:.4%}, perplexity {ppl[0]:.3f} vs {ppl[1]:.3f} "
                      f"({rel:.2%}) {'ok' if ok else 'FAIL'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

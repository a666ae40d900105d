"""Spot checks of the CUDA path against the CPU path on small random checkpoints.

For each family: streaming logits on DEVICE vs CPU (max abs difference), and a SparseGPT / Wanda
run on each: agreement of the pruned masks (block 0, fed the same embeddings on both devices, and
every block) and of the output perplexity. With --device cpu the script compares the CPU path with
itself: a dry run that checks the script, not the GPU (its lines say so).

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


# CUDA float32 against CPU float32 (no TF32): the logits agree to float noise; block 0's masks differ only at
# ties broken by float noise; later blocks see inputs that the pruned blocks before them made slightly different.
LOGITS_ATOL = 1e-4
BLOCK0_AGREEMENT = 0.999
AGREEMENT = 0.99
PERPLEXITY_RTOL = 0.005


def masks(model: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(model)
    return {n: ckpt.read(n) == 0 for n, i in ckpt.tensors.items() if len(i.shape) == 2 and ".layers." in n}


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    return sum(int((a[n] == b[n]).sum()) for n in names) / sum(a[n].numel() for n in names)


def verdict(ok: bool, device: str) -> str:
    if device == "cpu":
        return "(dry run: cpu against itself)" if ok else "FAIL (dry run: the script is broken)"
    return "ok" if ok else "FAIL"


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
            ok = diff <= LOGITS_ATOL
            failures += not ok
            print(f"{family:6} logits {args.device} vs cpu: max abs diff {diff:.2e} {verdict(ok, args.device)}")
            for method in ("sparsegpt", "wanda", "admm"):
                outs = {}
                for dev in (args.device, "cpu"):
                    outs[dev] = work / f"{family}-{method}-{dev}"
                    streamprune.prune(model, outs[dev], method=method, calib=calib, nsamples=16, seqlen=128,
                                      device=dev, blocksize=64)
                a, b = masks(outs[args.device]), masks(outs["cpu"])
                block0 = agreement(a, b, [n for n in a if ".layers.0." in n])
                agree = agreement(a, b, list(a))
                ppl = [streamprune.evaluate(outs[d], calib, seqlen=128, device="cpu").perplexity
                       for d in (args.device, "cpu")]
                rel = abs(ppl[0] / ppl[1] - 1)
                ok = block0 >= BLOCK0_AGREEMENT and agree >= AGREEMENT and rel <= PERPLEXITY_RTOL
                failures += not ok
                print(f"{family:6} {method:9} masks agree {block0:.4%} (block 0), {agree:.4%} (all), perplexity "
                      f"{ppl[0]:.3f} vs {ppl[1]:.3f} ({rel:.2%}) {verdict(ok, args.device)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

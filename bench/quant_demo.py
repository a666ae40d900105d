"""Joint sparsity + 4-bit quantization on the demo model: SparseGPT's joint sweep (GPTQ alone at sparsity 0)
against magnitude pruning with round-to-nearest, on the same calibration and evaluation windows as bench/demo.py.

Every quantized row uses the GPTQ paper's setting, 4 bits, asymmetric, one group per output row
(`--wbits 4 --group-size -1 --asym`); `--group-size 64` adds the same rows with groups of 64 columns (the demo
model's widths, 192 and 576, are not multiples of 128). The acceptance check: SparseGPT 50% + 4-bit must lose less
perplexity than 1.2 x (the loss of 50% alone + the loss of 4-bit GPTQ alone).

    python bench/quant_demo.py                  # per-row groups
    python bench/quant_demo.py --group-size 64
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.demo import NSAMPLES, SEQLEN  # noqa: E402
from bench.tinylm import demo_model, fixed_threads  # noqa: E402

SETTINGS = [  # label, sparsity, pattern, quantized
    ("50%", 0.5, "unstructured", False),
    ("4-bit", 0.0, "unstructured", True),
    ("50% + 4-bit", 0.5, "unstructured", True),
    ("2:4", None, "2:4", False),
    ("2:4 + 4-bit", None, "2:4", True),
]


def run(model_dir: Path, work: Path, group_size: int) -> dict[tuple[str, str], float]:
    test, train = model_dir / "test.txt", model_dir / "train.txt"
    results = {}
    with fixed_threads():
        results[("dense", "")] = streamprune.evaluate(model_dir, test, seqlen=SEQLEN, device="cpu").perplexity
        for method in ("sparsegpt", "magnitude"):
            for label, sparsity, pattern, quantized in SETTINGS:
                out = work / "out"
                quant = dict(wbits=4, group_size=group_size, sym=False) if quantized else {}
                calib = None if method == "magnitude" else train  # magnitude reads no statistics
                streamprune.prune(model_dir, out, method=method, sparsity=sparsity, pattern=pattern, calib=calib,
                                  nsamples=NSAMPLES, seqlen=SEQLEN, seed=0, device="cpu", **quant)
                results[(method, label)] = streamprune.evaluate(out, test, seqlen=SEQLEN, device="cpu").perplexity
                shutil.rmtree(out)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the demo model trained into this cache here (make fixture-train), not the shipped one")
    ap.add_argument("--group-size", type=int, default=-1)
    add_record_option(ap)
    args = ap.parse_args()
    model = demo_model(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="streamprune-quant-") as work:
        r = run(model, Path(work), args.group_size)
    with recording(ap, args, ignore=("cache_dir",)):
        dense = r[("dense", "")]
        print(f"perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} tokens); "
              f"4-bit: asymmetric, group size {args.group_size}; change from dense in brackets")
        print(f"{'setting':<14}{'sparsegpt / gptq':>20}{'magnitude / rtn':>20}")
        print(f"{'dense':<14}{dense:>20.2f}{dense:>20.2f}")
        for label, *_ in SETTINGS:
            cells = [f"{r[(m, label)]:.2f} ({r[(m, label)] - dense:+.2f})" for m in ("sparsegpt", "magnitude")]
            print(f"{label:<14}{cells[0]:>20}{cells[1]:>20}")
        up = {label: r[("sparsegpt", label)] - dense for label, *_ in SETTINGS}
        bound = 1.2 * (up["50%"] + up["4-bit"])
        verdict = "met" if up["50% + 4-bit"] < bound else "NOT met"
        print(f"acceptance: 50% + 4-bit loses {up['50% + 4-bit']:+.2f}, 1.2 x (50% {up['50%']:+.2f} + 4-bit "
              f"{up['4-bit']:+.2f}) = {bound:+.2f}: {verdict}")


if __name__ == "__main__":
    main()

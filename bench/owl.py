"""Uniform against OWL allocation on the demo model: perplexity, block sparsities, and the dense pass's cost.

Prunes the demo model (bench/tinylm-v2) as bench/demo.py does (calibration: 64 windows
of 128 tokens of its training text, seed 0, one thread), with each method at each sparsity, once with
--allocation uniform, once with --allocation owl (the paper's lambda 0.08 and M 5 unless given) and once with owl
at lambda 0 (the target in every block, each linear's count exact as in an owl run: the control), and evaluates
every result on the held-out text with `streamprune eval`'s function. Prints the perplexities, the allocation (the
outlier ratios and block sparsities, the same for every method: they come from the dense model), each run's total
sparsity, and the time of the "owl" phase (the dense pass) beside the run's "forward" phase and the whole run.

    python bench/owl.py                                  # sparsegpt and wanda at 50, 60, 70%
    python bench/owl.py --methods magnitude --sparsity 0.7
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
from streamprune.owl import OWL_LAMBDA, OWL_M  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"])
    ap.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    ap.add_argument("--owl-lambda", type=float, default=OWL_LAMBDA)
    ap.add_argument("--owl-m", type=float, default=OWL_M)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the demo model trained into this cache here (make fixture-train), not the shipped one")
    add_record_option(ap)
    args = ap.parse_args()
    model = demo_model(args.cache_dir)
    test, train = model / "test.txt", model / "train.txt"
    rows, allocations = [], {}
    with fixed_threads(), tempfile.TemporaryDirectory(prefix="streamprune-owl-") as work:
        dense = streamprune.evaluate(model, test, seqlen=SEQLEN, device="cpu").perplexity
        for method in args.methods:
            for sparsity in args.sparsity:
                # "owl, lambda 0": every block at the target, but with the exact per-linear counts of an owl run (Wanda's
                # uniform rounding removes ceil(sparsity x columns) per row, a little more than the target)
                for allocation, owl_lambda in (("uniform", args.owl_lambda), ("owl", 0.0), ("owl", args.owl_lambda)):
                    out = Path(work) / f"{method}-{sparsity}-{allocation}-{owl_lambda}"
                    report = streamprune.prune(model, out, method=method, sparsity=sparsity, calib=train,
                                               nsamples=NSAMPLES, seqlen=SEQLEN, seed=0, device="cpu",
                                               allocation=allocation, owl_lambda=owl_lambda, owl_m=args.owl_m)
                    if allocation == "owl" and owl_lambda != args.owl_lambda:
                        allocation = "owl, lambda 0"
                    ppl = streamprune.evaluate(out, test, seqlen=SEQLEN, device="cpu").perplexity
                    rows.append((method, sparsity, allocation, ppl, report.total_sparsity, report.phases["owl"],
                                 report.phases["forward"], report.wall_seconds))
                    if allocation == "owl":
                        allocations[sparsity] = report.allocation
                    shutil.rmtree(out)
    with recording(ap, args, ignore=("cache_dir",)):
        print(f"perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} tokens of the "
              f"training text); dense {dense:.2f}; owl: lambda {args.owl_lambda:g}, M {args.owl_m:g}")
        print(f"{'method':<10} {'sparsity':>8} {'allocation':>13} {'perplexity':>10} {'increase':>9} {'total sp.':>9} "
              f"{'owl s':>6} {'fwd s':>6} {'run s':>6}")
        for method, sparsity, allocation, ppl, total, owl_s, fwd_s, wall in rows:
            print(f"{method:<10} {sparsity:>8.2f} {allocation:>13} {ppl:>10.2f} {ppl - dense:>+9.2f} {total:>9.4f} "
                  f"{owl_s:>6.2f} {fwd_s:>6.2f} {wall:>6.2f}")
        for sparsity, alloc in allocations.items():
            ratios = ", ".join(f"{r:.5f}" for r in alloc["outlier_ratios"])
            blocks = ", ".join(f"{s:.4f}" for s in alloc["block_sparsity"])
            print(f"sparsity {sparsity:g}: outlier ratios [{ratios}] -> block sparsity [{blocks}]")


if __name__ == "__main__":
    main()

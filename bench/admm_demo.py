"""SparseGPT against ADMM (its default final solve, and `--admm-solve exact`) on the demo model, at 50%, 60%, 70%
unstructured and 2:4.

The same model, calibration (64 x 128 tokens of the training text) and held-out evaluation as bench/demo.py, on one
thread. Prints each perplexity, its increase over the dense model, ADMM's increase as a share of SparseGPT's and of
the exact solve's, and the solve phase of each run.

    python bench/admm_demo.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.demo import NSAMPLES, SEQLEN  # noqa: E402
from bench.tinylm import demo_model, fixed_threads  # noqa: E402

SETTINGS = ("0.5", "0.6", "0.7", "2:4")
METHODS = {"sparsegpt": ("sparsegpt", {}), "admm": ("admm", {}), "admm exact": ("admm", {"admm_solve": "exact"})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the demo model trained into this cache here (make fixture-train), not the shipped one")
    add_record_option(ap)
    args = ap.parse_args()
    model = demo_model(args.cache_dir)
    test, train = model / "test.txt", model / "train.txt"
    ppl: dict[tuple[str, str], float] = {}
    solve: dict[tuple[str, str], float] = {}
    with fixed_threads(), tempfile.TemporaryDirectory(prefix="streamprune-admm-") as work:
        dense = streamprune.evaluate(model, test, seqlen=SEQLEN, device="cpu").perplexity
        for setting in SETTINGS:
            shape = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
            for label, (method, knobs) in METHODS.items():
                out = Path(work) / f"{label.replace(' ', '-')}-{setting.replace(':', 'of')}"
                report = streamprune.prune(model, out, method=method, calib=train, nsamples=NSAMPLES, seqlen=SEQLEN,
                                           seed=0, device="cpu", **knobs, **shape)
                ppl[(label, setting)] = streamprune.evaluate(out, test, seqlen=SEQLEN, device="cpu").perplexity
                solve[(label, setting)] = report.phases["solve"]
    with recording(ap, args, ignore=("cache_dir",)):
        print(f"perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} tokens of the "
              f"training text); dense {dense:.2f}; increase over dense in brackets; admm/...: admm's increase over "
              f"theirs; solve phase in seconds (sparsegpt / admm / admm exact)")
        print(f"{'setting':<8} {'sparsegpt':>18} {'admm':>18} {'admm exact':>18} {'admm/sparsegpt':>15} "
              f"{'admm/exact':>11} {'solve s':>20}")
        for setting in SETTINGS:
            label = setting if ":" in setting else f"{float(setting):.0%}"
            rise = {m: ppl[(m, setting)] - dense for m in METHODS}
            cells = [f"{ppl[(m, setting)]:8.2f} ({rise[m]:+6.2f})" for m in METHODS]
            times = " / ".join(f"{solve[(m, setting)]:5.2f}" for m in METHODS)
            print(f"{label:<8} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18} {rise['admm'] / rise['sparsegpt']:15.2f} "
                  f"{rise['admm'] / rise['admm exact']:11.2f} {times:>20}")


if __name__ == "__main__":
    main()

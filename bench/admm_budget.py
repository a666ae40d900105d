"""What ADMM's quality costs in GEMMs: the demo model at 70% and 2:4 with fewer ADMM iterations and fewer conjugate-
gradient steps of the final solve than the defaults, against the exact solve.

Each ADMM iteration after the first, each final step and the final solve's starting residual is one product of
rows x d² per linear (SparseGPT's whole sweep is one); the table gives that count per linear beside each setting's
perplexity increase over the dense model and its ratio to the exact solve's (8 iterations, solved to 1e-4). The same
model, calibration and held-out text as bench/admm_demo.py, one thread.

    python bench/admm_budget.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.demo import NSAMPLES, SEQLEN  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import demo_model, fixed_threads  # noqa: E402
from streamprune.pruners import admm  # noqa: E402

SETTINGS = ("0.7", "2:4")
BUDGETS = ((8, 4), (8, 3), (8, 2), (6, 4), (5, 4), (4, 4), (4, 2), (3, 2))  # (iterations, final steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_record_option(ap)
    args = ap.parse_args()
    model = demo_model(None)
    test, train = model / "test.txt", model / "train.txt"
    rise: dict[tuple[str, str], float] = {}
    default_steps = admm.PCG_STEPS
    with fixed_threads(), tempfile.TemporaryDirectory(prefix="streamprune-admm-budget-") as work:
        dense = streamprune.evaluate(model, test, seqlen=SEQLEN, device="cpu").perplexity

        def increase(setting: str, label: str, **knobs) -> None:
            shape = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
            out = Path(work) / f"{label}-{setting.replace(':', 'of')}"
            streamprune.prune(model, out, method="admm", calib=train, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0,
                              device="cpu", **knobs, **shape)
            rise[(label, setting)] = streamprune.evaluate(out, test, seqlen=SEQLEN, device="cpu").perplexity - dense

        try:
            for setting in SETTINGS:
                increase(setting, "exact", admm_solve="exact")
                for iterations, steps in BUDGETS:
                    admm.PCG_STEPS = steps
                    increase(setting, f"{iterations}/{steps}", admm_iterations=iterations)
        finally:
            admm.PCG_STEPS = default_steps
    with recording(ap, args):
        print(f"the demo model; perplexity increase over dense ({dense:.2f}) on held-out text ({SEQLEN}-token windows; "
              f"calibration {NSAMPLES} x {SEQLEN} tokens); in brackets, its ratio to the exact solve's; GEMMs: "
              f"products of rows x d^2 per linear (iterations - 1 + 1 + steps); default {admm.DEFAULT_ITERATIONS}/"
              f"{default_steps}")
        print(f"{'iterations/steps':>16} {'GEMMs':>6} " + " ".join(f"{s:>16}" for s in SETTINGS))
        for label in ["exact", *(f"{i}/{s}" for i, s in BUDGETS)]:
            gemms = "-" if label == "exact" else str(sum(map(int, label.split("/"))))
            cells = [f"{rise[(label, s)]:+7.3f} ({rise[(label, s)] / rise[('exact', s)]:5.2f})" for s in SETTINGS]
            print(f"{label:>16} {gemms:>6} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()

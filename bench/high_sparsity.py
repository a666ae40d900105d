"""Beyond SparseGPT at high sparsity: every method, uniform and with OWL's per-block sparsities, on the bench model.

Prunes the demo model (bench/tinylm-v2) with magnitude, Wanda, SparseGPT and ADMM (with its default final solve, and
with `--admm-solve exact`: `admm exact`) at 50%, 60% and 70% unstructured,
each with `--allocation uniform` and `--allocation owl` (the paper's lambda and M), and at 2:4 (N:M keeps uniform
allocation), calibrated as the demo is (64 windows of 128 tokens of the training text, one thread), and evaluates
every result with `streamprune.evaluate` on the held-out text (the same 261 windows of 128 tokens). Prints a
markdown table of perplexities (change from dense in brackets) and the checks.

    python bench/high_sparsity.py                  # what `make bench-high-sparsity` runs
    python bench/high_sparsity.py --out bench/results/high_sparsity.md
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.demo import NSAMPLES, SEQLEN  # noqa: E402
from bench.tinylm import demo_model, fixed_threads  # noqa: E402

METHODS = {"magnitude": ("magnitude", {}), "wanda": ("wanda", {}), "sparsegpt": ("sparsegpt", {}), "admm": ("admm", {}),
           "admm exact": ("admm", {"admm_solve": "exact"})}  # row label -> method and its options
LEVELS = ("0.5", "0.6", "0.7", "2:4")


def measure(model: Path, work: Path) -> tuple[float, dict[tuple[str, str, str], tuple[float, float]]]:
    """The dense perplexity, and (method, allocation, level) -> (perplexity, seconds of the run)."""
    test, train = model / "test.txt", model / "train.txt"
    results = {}
    with fixed_threads():
        dense = streamprune.evaluate(model, test, seqlen=SEQLEN, device="cpu").perplexity
        for level in LEVELS:
            structured = ":" in level
            for label, (method, knobs) in METHODS.items():
                for allocation in ("uniform",) if structured else ("uniform", "owl"):
                    out = work / f"{label.replace(' ', '-')}-{allocation}-{level.replace(':', 'of')}"
                    t = time.perf_counter()
                    streamprune.prune(model, out, method=method, calib=train, nsamples=NSAMPLES, seqlen=SEQLEN,
                                      seed=0, device="cpu", allocation=allocation, **knobs,
                                      **({"pattern": level} if structured else {"sparsity": float(level)}))
                    seconds = time.perf_counter() - t
                    ppl = streamprune.evaluate(out, test, seqlen=SEQLEN, device="cpu").perplexity
                    results[(label, allocation, level)] = (ppl, seconds)
                    shutil.rmtree(out)
                    print(f"{label:<10} {allocation:<8} {level:>4}: {ppl:9.3f} ({seconds:.1f} s)", file=sys.stderr)
    return dense, results


def table(dense: float, results: dict[tuple[str, str, str], tuple[float, float]]) -> str:
    head = [f"{float(level):.0%}" if ":" not in level else level for level in LEVELS]
    lines = ["| method | allocation | " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(LEVELS),
             "| dense | | " + " | ".join(f"{dense:.2f}" for _ in LEVELS) + " |"]
    for method in METHODS:
        for allocation in ("uniform", "owl"):
            cells = []
            for level in LEVELS:
                got = results.get((method, allocation, level))
                cells.append("-" if got is None else f"{got[0]:.2f} ({got[0] - dense:+.2f})")
            lines.append(f"| {method} | {allocation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(dense: float, results: dict[tuple[str, str, str], tuple[float, float]]) -> list[str]:
    rise = {key: ppl - dense for key, (ppl, _) in results.items()}
    sgpt70, sgpt24 = rise[("sparsegpt", "uniform", "0.7")], rise[("sparsegpt", "uniform", "2:4")]
    best70 = min((rise[k], k) for k in [("admm", "uniform", "0.7"), ("sparsegpt", "owl", "0.7"), ("admm", "owl", "0.7")])
    admm24 = rise[("admm", "uniform", "2:4")]
    added = [("admm", "uniform"), ("sparsegpt", "owl"), ("admm", "owl")]  # what this comparison is about
    worse50 = [f"{m}+{a}" for m, a in added if rise[(m, a, "0.5")] > rise[("sparsegpt", "uniform", "0.5")]]
    owl_worse = [f"{m} at {level}" for (m, a, level), r in rise.items() if a == "owl" and r > rise[(m, "uniform", level)]]
    exact = [(level, rise[("admm", "uniform", level)], rise[("admm exact", "uniform", level)],
              rise[("sparsegpt", "uniform", level)]) for level in ("0.7", "2:4")]
    return [
        f"- 70%: best of admm, sparsegpt+owl, admm+owl is {best70[1][0]}+{best70[1][1]}, increase {best70[0]:+.2f} = "
        f"{best70[0] / sgpt70:.2f}x SparseGPT's {sgpt70:+.2f} (target <= 0.75x): {'holds' if best70[0] <= 0.75 * sgpt70 else 'does not hold'}",
        f"- 2:4: admm's increase {admm24:+.2f} = {admm24 / sgpt24:.2f}x SparseGPT's {sgpt24:+.2f} (target <= 0.9x): "
        f"{'holds' if admm24 <= 0.9 * sgpt24 else 'does not hold'}",
        f"- 50%: of admm, sparsegpt+owl and admm+owl, worse than SparseGPT: {', '.join(worse50) if worse50 else 'none'}",
        f"- OWL worse than uniform allocation for the same method: {', '.join(owl_worse) if owl_worse else 'nowhere'}",
        *(f"- {'2:4' if ':' in level else f'{float(level):.0%}'}: admm's increase {a:+.2f} = {a / e:.2f}x admm "
          f"exact's {e:+.2f} (target <= 1.10x) and {a / sg:.2f}x SparseGPT's {sg:+.2f} (target < 1x): "
          f"{'holds' if a <= 1.1 * e and a < sg else 'does not hold'}" for level, a, e, sg in exact),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="also write the table and checks (markdown) here")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the demo model trained into this cache here (make fixture-train), not the shipped one")
    args = ap.parse_args()
    model = demo_model(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="streamprune-high-") as work:
        dense, results = measure(model, Path(work))
    seconds = {m: sum(s for (mm, _, _), (_, s) in results.items() if mm == m) for m in METHODS}
    text = (f"Perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} tokens of the "
            "training text; one thread; change from dense in brackets)\n\n" + table(dense, results) + "\n\n"
            + "\n".join(checks(dense, results)) + "\n- run seconds per method, summed over its runs: "
            + ", ".join(f"{m} {s:.0f}" for m, s in seconds.items()) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""The demo: prune a small trained language model with each method and compare perplexities.

Takes the demo model shipped in bench/tinylm-v2 (the LLaMA-architecture model bench/tinylm.py trained on English
text that ships with Python), prunes it at 50% unstructured and 2:4 with magnitude, Wanda and
SparseGPT (calibration: windows of its training text) and evaluates every result on its held-out
text with `streamprune eval`'s function, on the same windows. It runs on the model's training
thread count (one), not one thread per core: SparseGPT's masks, hence its 2:4 figure, change with
the thread count.

    python bench/demo.py            # what `make demo` runs
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
from bench.tinylm import demo_model, fixed_threads  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")
SEQLEN = 128
NSAMPLES = 64


def run_demo(model_dir: Path, work: Path, methods: tuple[str, ...] = METHODS,
             patterns: tuple[str, ...] = PATTERNS, keep: bool = False) -> dict[tuple[str, str], float]:
    """Perplexity on the held-out text of the dense model ("dense", "") and of each pruned one."""
    test, train = model_dir / "test.txt", model_dir / "train.txt"
    with fixed_threads():
        results = {("dense", ""): streamprune.evaluate(model_dir, test, seqlen=SEQLEN, device="cpu").perplexity}
        for pattern in patterns:
            for method in methods:
                out = work / f"{method}-{pattern.replace(':', 'of')}"
                streamprune.prune(model_dir, out, method=method, pattern=pattern, calib=train, nsamples=NSAMPLES,
                                  seqlen=SEQLEN, seed=0, device="cpu")
                results[(method, pattern)] = streamprune.evaluate(out, test, seqlen=SEQLEN, device="cpu").perplexity
                if not keep:
                    shutil.rmtree(out)
    return results


def table(results: dict[tuple[str, str], float]) -> str:
    dense = results[("dense", "")]
    patterns = [p for p in PATTERNS if any(k[1] == p for k in results)]
    lines = [f"{'method':<10} " + " ".join(f"{p + ' 50%' if p == 'unstructured' else p:>18}" for p in patterns),
             f"{'dense':<10} " + " ".join(f"{dense:>18.2f}" for _ in patterns)]
    for method in METHODS:
        cells = [f"{results[(method, p)]:>9.2f} ({results[(method, p)] - dense:+7.2f})" for p in patterns
                 if (method, p) in results]
        lines.append(f"{method:<10} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the demo model trained into this cache here (make fixture-train), not the shipped one")
    args = ap.parse_args()
    model = demo_model(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="streamprune-demo-") as work:
        results = run_demo(model, Path(work))
    print(f"perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} tokens of the "
          "training text; change from dense in brackets)")
    print(table(results))


if __name__ == "__main__":
    main()

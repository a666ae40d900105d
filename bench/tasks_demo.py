"""Zero-shot accuracy of the demo model, dense and pruned, on a LAMBADA-style task built from its held-out text.

Writes the task (`bench/lastword.py`: each held-out sentence of 8 to 60 words, its last word scored given the rest;
DOCS documents) into a temporary folder, then prunes the shipped demo model (bench/tinylm-v2) with magnitude, Wanda
and SparseGPT at 50% unstructured and 2:4, with the demo's calibration (NSAMPLES windows of SEQLEN tokens of the
training text, seed 0), each run scoring the task on the pruned model in the same pass (`run --eval-tasks`; the
first run also on the dense model, `--eval-dense`). lm-eval computes the metrics: `acc` (the last word predicted
greedily) and `perplexity` of the last words. One thread, as the demo.

    python bench/tasks_demo.py [--docs 500] [--record]
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
from bench.demo import METHODS, NSAMPLES, PATTERNS, SEQLEN  # noqa: E402
from bench.lastword import write_task  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import demo_model, fixed_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=500)
    add_record_option(ap)
    args = ap.parse_args()
    start = time.perf_counter()
    model = demo_model()
    rows: dict[tuple[str, str], dict] = {}
    with fixed_threads(), tempfile.TemporaryDirectory(prefix="streamprune-tasks-") as tmp:
        work = Path(tmp)
        task = write_task((model / "test.txt").read_text(encoding="utf-8"), work / "tasks", args.docs)
        for method in METHODS:
            for pattern in PATTERNS:
                first = not rows
                report = streamprune.prune(model, work / "out", method=method, pattern=pattern,
                                           calib=model / "train.txt", nsamples=NSAMPLES, seqlen=SEQLEN, seed=0,
                                           device="cpu", eval_tasks=[task], include_path=work / "tasks",
                                           eval_dense=first)
                if first:
                    rows[("dense", "")] = report.tasks["dense_results"][task]
                rows[(method, pattern)] = report.tasks["results"][task]
                shutil.rmtree(work / "out")
        docs = rows[("dense", "")]["sample_len"]
    with recording(ap, args):
        print(f"tinylm-v2 on a LAMBADA-style task of its held-out text ({docs} sentences, the last word scored; "
              f"calibration {NSAMPLES} x {SEQLEN} tokens of the training text): lm-eval's acc (last word predicted "
              "greedily) and perplexity of the last words")
        print()
        print("| method | pattern | acc | perplexity |")
        print("| --- | --- | ---: | ---: |")
        for (method, pattern), r in rows.items():
            label = "-" if method == "dense" else "50%" if pattern == "unstructured" else pattern
            print(f"| {method} | {label} | {r['acc,none']:.4f} | {r['perplexity,none']:.2f} |")
        print()
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""Removing routed experts from the Mixtral-shaped demo model: which criterion keeps the perplexity best, and how
much of REAP's loss does --compensate-experts win back?

Builds (or finds in its cache) `tinymoe` of bench/tinylm.py (4 blocks of 8 Mixtral experts, top-2 routing), then
removes 25% and 50% of the experts of every block with `streamprune run --prune-experts F --sparsity 0` (every kept
tensor copied bit for bit) under each `--expert-criterion`: reap, ean, frequency, and random with three seeds (their
mean, and the range), REAP with `--compensate-experts` (the kept experts' down projections fitted to the dense
block), and once more REAP at 50% with the kept experts and every other linear pruned by SparseGPT to 50% and
quantized to 4 bits, written packed (compressed-tensors). Each output is evaluated on the held-out text with
`streamprune eval` (the same windows for every row), and on the demo's task (bench/tasks_demo.py: the last word of
each of DOCS held-out sentences, lm-eval's acc) in the run's own pass (`--eval-tasks`); its size on disk is that of
its safetensors files. Calibration: NSAMPLES windows of SEQLEN tokens drawn from the training text (seed 0). Runs on
one thread.

    python bench/expert_pruning.py [--record]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.lastword import write_task  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import TINYMOE, build_tiny_lm, fixed_threads  # noqa: E402

SEQLEN = 128
NSAMPLES = 64
FRACTIONS = (0.25, 0.5)
RANDOM_SEEDS = (0, 1, 2)
GROUP = 48  # divides the hidden size (192) and the experts' width (144)
DOCS = 500  # the demo task's sentences


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run(model: Path, out: Path, task: str, **options) -> tuple[float, int, float]:
    """Perplexity on the held-out text, bytes on disk and the task's accuracy of one run's output."""
    report = streamprune.prune(model, out, calib=model / "train.txt", nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu",
                               eval_tasks=[task], include_path=out.parent / "tasks", **options)
    ppl = streamprune.evaluate(out, model / "test.txt", seqlen=SEQLEN, device="cpu").perplexity
    nbytes = size(out)
    shutil.rmtree(out)
    return ppl, nbytes, report.tasks["results"][task]["acc,none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None)
    add_record_option(ap)
    args = ap.parse_args()
    start = time.perf_counter()
    model = build_tiny_lm(args.cache_dir, TINYMOE)
    rows: list[tuple[str, str, float, str, int, float]] = []  # (removed, criterion, perplexity, note, bytes, acc)
    with fixed_threads(), tempfile.TemporaryDirectory(prefix="streamprune-experts-") as tmp:
        work = Path(tmp)
        task = write_task((model / "test.txt").read_text(encoding="utf-8"), work / "tasks", DOCS)
        dense = streamprune.evaluate(model, model / "test.txt", seqlen=SEQLEN, device="cpu").perplexity
        dense_acc = streamprune.evaluate(model, None, tasks=[task], include_path=work / "tasks",
                                         device="cpu").tasks["results"][task]["acc,none"]
        rows.append(("0", "dense", dense, "", size(model), dense_acc))
        for fraction in FRACTIONS:
            for criterion in ("reap", "ean", "frequency"):
                ppl, nbytes, acc = run(model, work / "out", task, sparsity=0.0, prune_experts=fraction,
                                       expert_criterion=criterion)
                rows.append((f"{fraction:.0%}", criterion, ppl, "", nbytes, acc))
            drawn = [run(model, work / "out", task, sparsity=0.0, prune_experts=fraction, expert_criterion="random",
                         seed=seed) for seed in RANDOM_SEEDS]
            ppls = [p for p, _, _ in drawn]
            rows.append((f"{fraction:.0%}", f"random (seeds {', '.join(map(str, RANDOM_SEEDS))})",
                         statistics.mean(ppls), f"mean of {min(ppls):.2f} to {max(ppls):.2f}", drawn[0][1],
                         statistics.mean(a for _, _, a in drawn)))
            ppl, nbytes, acc = run(model, work / "out", task, sparsity=0.0, prune_experts=fraction,
                                   compensate_experts=True)
            rows.append((f"{fraction:.0%}", "reap, compensated", ppl, "", nbytes, acc))
        ppl, nbytes, acc = run(model, work / "out", task, sparsity=0.5, prune_experts=0.5, expert_criterion="reap",
                               wbits=4, group_size=GROUP, format="compressed-tensors")
        rows.append(("50%", "reap + SparseGPT 50% + 4-bit", ppl, f"packed, group {GROUP}", nbytes, acc))
    with recording(ap, args, ignore=("cache_dir",)):
        print(f"{model.name}: perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} "
              "tokens of the training text, seed 0; change from dense in brackets); the experts removed from each of "
              f"the 4 MoE blocks of 8; acc: lm-eval's on the demo's task (the last word of {DOCS} held-out sentences, "
              "bench/tasks_demo.py); output size: its safetensors files")
        print("(tinymoe-v2 is trained on the machine that runs this, by `make fixture-moe`: it is not shipped, and "
              "another machine's build is another model)")
        print()
        print("| experts removed | criterion | perplexity | | acc | output MB |")
        print("| ---: | --- | ---: | --- | ---: | ---: |")
        for removed, criterion, ppl, note, nbytes, acc in rows:
            delta = "" if criterion == "dense" else f" ({ppl - dense:+.2f})"
            print(f"| {removed} | {criterion} | {ppl:.2f}{delta} | {note} | {acc:.4f} | {nbytes / 1e6:.2f} |")
        print()
        for fraction in FRACTIONS:
            plain, fitted = (next(p for r, c, p, *_ in rows if r == f"{fraction:.0%}" and c == name)
                             for name in ("reap", "reap, compensated"))
            print(f"at {fraction:.0%} removed, compensation keeps {(fitted - dense) / (plain - dense):.2f}x plain "
                  "REAP's perplexity increase")
        print()
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""The perplexity curve of the bench language model: one `streamprune sweep` against separate runs.

Runs `streamprune sweep` (a subprocess, so that its peak RSS is its own) on the demo model (bench/tinylm-v2):
magnitude, Wanda and SparseGPT at 9 unstructured levels (10% to 90%) and at 2:4, calibrated on its training
text as the demo is, evaluated on its held-out text. Then, for every point, what a curve took before: a separate
`streamprune run` of the point and `streamprune eval` of its output (and `eval` of the dense model), as commands;
and the same through the Python API in this process, beside the sweep through the API. Everything on one thread. Prints and writes a markdown table
(the sweep's perplexity and the separate commands', their agreement in significant digits, the wall times, the
sweep's peak RSS against `plan --sweep`) and copies the sweep's plot.

    python bench/sweep.py                       # what `make bench-sweep` runs; writes bench/results/sweep.*
    python bench/sweep.py --levels 0.5 --methods magnitude --no-separate   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from streamprune.pipeline import sweep  # noqa: E402
from bench.demo import NSAMPLES, SEQLEN  # noqa: E402
from bench.tinylm import THREADS, demo_model, fixed_threads  # noqa: E402

LEVELS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
METHODS = "sparsegpt,wanda,magnitude"


def significant_digits(a: float, b: float) -> float:
    """How many leading significant digits two positive figures share (inf when equal)."""
    return math.inf if a == b else -math.log10(abs(a - b) / abs(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default=LEVELS)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--patterns", default="2:4")
    ap.add_argument("--no-separate", action="store_true", help="only the sweep")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where sweep.md and sweep.png go")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="the demo model trained into this cache here (make fixture-train), not the shipped one")
    args = ap.parse_args()
    model = demo_model(args.cache_dir)
    train, test = model / "train.txt", model / "test.txt"
    common = ["--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--eval-seqlen", str(SEQLEN), "--device", "cpu",
              "--methods", args.methods, "--sparsities", args.levels, "--patterns", args.patterns]
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS)}  # the model's training thread count, as the demo runs
    cli = [sys.executable, "-c", "from streamprune.cli import main; main()"]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamprune-sweep-") as work:
        out = Path(work) / "sweep"
        planned = Path(work) / "plan.json"
        subprocess.run([*cli, "plan", str(model), "--sweep", "--eval", str(test), *common, "--json", str(planned)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        start = time.perf_counter()
        subprocess.run([*cli, "sweep", str(model), str(out), "--calib", str(train), "--eval", str(test), *common],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        sweep_wall = time.perf_counter() - start
        result = json.loads((out / "sweep.json").read_text())
        plan = json.loads(planned.read_text())
        if (out / "sweep.png").is_file():
            shutil.copy(out / "sweep.png", args.out / "sweep.png")
        separate: dict[str, tuple[float, float]] = {}  # label -> (perplexity, seconds): the commands a user runs
        library: dict[str, tuple[float, float]] = {}  # the same through the Python API, in this process
        if not args.no_separate:
            test_args = ["--seqlen", str(SEQLEN), "--device", "cpu"]
            for p in result["points"]:
                level = ["--sparsity", str(p["sparsity"])] if p["pattern"] == "unstructured" else []
                dst, res = Path(work) / p["label"], Path(work) / f"{p['label']}.json"
                t = time.perf_counter()
                subprocess.run([*cli, "run", str(model), str(dst), "--method", p["method"], "--pattern", p["pattern"],
                                *level, "--calib", str(train), "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
                                "--device", "cpu"], check=True, env=env, stdout=subprocess.DEVNULL)
                subprocess.run([*cli, "eval", str(dst), "--data", str(test), *test_args, "--json", str(res)],
                               check=True, env=env, stdout=subprocess.DEVNULL)
                separate[p["label"]] = (json.loads(res.read_text())["perplexity"], time.perf_counter() - t)
                shutil.rmtree(dst)
            t = time.perf_counter()
            dense_json = Path(work) / "dense.json"
            subprocess.run([*cli, "eval", str(model), "--data", str(test), *test_args, "--json", str(dense_json)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            separate["dense"] = (json.loads(dense_json.read_text())["perplexity"], time.perf_counter() - t)
            with fixed_threads():
                t = time.perf_counter()
                api_sweep = sweep(
                    model, Path(work) / "api-sweep", methods=args.methods.split(","),
                    sparsities=[float(v) for v in args.levels.split(",")], patterns=[p for p in args.patterns.split(",") if p],
                    calib=train, eval=test, nsamples=NSAMPLES, seqlen=SEQLEN, eval_seqlen=SEQLEN, device="cpu")
                library["sweep"] = (api_sweep.dense_perplexity, time.perf_counter() - t)
                assert [p["perplexity"] for p in api_sweep.points] == [p["perplexity"] for p in result["points"]]
                for p in result["points"]:
                    t = time.perf_counter()
                    dst = Path(work) / p["label"]
                    streamprune.prune(model, dst, method=p["method"], pattern=p["pattern"], calib=train,
                                      sparsity=p["sparsity"] if p["pattern"] == "unstructured" else None,
                                      nsamples=NSAMPLES, seqlen=SEQLEN, seed=0, device="cpu")
                    ppl = streamprune.evaluate(dst, test, seqlen=SEQLEN, device="cpu").perplexity
                    library[p["label"]] = (ppl, time.perf_counter() - t)
                    shutil.rmtree(dst)
                t = time.perf_counter()
                dense = streamprune.evaluate(model, test, seqlen=SEQLEN, device="cpu").perplexity
                library["dense"] = (dense, time.perf_counter() - t)
    lines = [f"`streamprune sweep` of {result['model']['name']} ({result['model']['n_layers']} blocks): "
             f"{len(result['points'])} points, perplexity on {result['eval']['windows']} x {result['eval']['seqlen']}"
             f" held-out tokens; calibration {NSAMPLES} x {SEQLEN} tokens of the training text; {THREADS} thread.",
             "",
             "| method | pattern | sparsity | sweep perplexity | separate run + eval | equal digits |",
             "|---|---|---:|---:|---:|---:|"]
    rows = [("dense", "", 0.0, result["dense_perplexity"], "dense")]
    rows += [(p["method"], p["pattern"], p["total_sparsity"], p["perplexity"], p["label"]) for p in result["points"]]
    digits = []
    for method, pattern, sparsity, ppl, label in rows:
        other = separate.get(label)
        if other:
            digits.append(significant_digits(ppl, other[0]))
        lines.append(f"| {method} | {pattern} | {sparsity:.4f} | {ppl:.4f} | "
                     f"{'-' if other is None else f'{other[0]:.4f}'} | "
                     f"{'-' if other is None else ('all' if math.isinf(digits[-1]) else f'{digits[-1]:.1f}')} |")
    reads = sorted({r["reads"] for r in result["reads"]})
    host_peak = result["process_peak_rss_bytes"]
    lines += ["", f"- blocks read: {len(result['reads'])}, each {'/'.join(map(str, reads))} time(s) "
              f"({sum(r['bytes'] for r in result['reads']) / 2**20:.1f} MiB in all)",
              f"- sweep wall time: {sweep_wall:.1f} s (its report: {result['wall_seconds']:.1f} s; phases "
              + ", ".join(f"{k} {v:.1f} s" for k, v in result["phases"].items()) + ")"]
    if separate:
        api_sweep_seconds = library.pop("sweep")[1]
        total, api = (sum(s for _, s in figures.values()) for figures in (separate, library))
        lines += [f"- separate `streamprune run` + `streamprune eval` of every point, and `eval` of the dense model, "
                  f"summed: {total:.1f} s; the sweep takes {sweep_wall / total:.2f}x their time",
                  f"- the same runs and evals through the Python API in one process (no process starts, and glibc's "
                  f"default allocator, where the command line serves large buffers from their own mappings): "
                  f"{api:.1f} s; the same sweep through the API in that process: {api_sweep_seconds:.1f} s, "
                  f"{api_sweep_seconds / api:.2f}x their time",
                  f"- agreement with the separate commands: at least {min(digits):.1f} significant digits over "
                  f"{len(digits)} perplexities" if digits and not all(math.isinf(d) for d in digits) else
                  f"- agreement with the separate commands: all {len(digits)} perplexities equal"]
    lines.append(f"- peak RSS of the sweep (the OS's VmHWM): {host_peak / 2**20:.0f} MiB; `plan --sweep` predicted "
                 f"{plan['host_peak_bytes'] / 2**20:.0f} MiB ({host_peak / plan['host_peak_bytes'] - 1:+.0%})")
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "sweep.md").write_text(text)


if __name__ == "__main__":
    main()

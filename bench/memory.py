"""Peak host memory of `streamprune run` against model depth, measured and as `streamprune plan` predicts.

Generates random LLaMA-shaped bf16 checkpoints of one block shape at increasing depth, prunes each
in a fresh process, and prints: depth, checkpoint size, measured peak RSS (the OS's VmHWM, file-backed
pages included), the planner's prediction, and time per block.

    python bench/memory.py                       # depths 4 16 32 64, hidden 2048, ffn 8192 (8.9 GB at 64)
    python bench/memory.py --depths 2 4 --hidden 512 --ffn 1376      # a quick look
    python bench/memory.py --device cuda         # also reports peak GPU memory
    python bench/memory.py --family mixtral --experts 8 64 --depths 4 16 --hidden 1024 --ffn 1024
        # Mixture-of-Experts: the same expert shape with 8 and with 64 experts per block, each at every depth
    python bench/memory.py --eval-tasks 500 --depths 4 16 32 --hidden 1024 --ffn 2752
        # each run also scores a LAMBADA-style task of 500 sentences in the same pass (`run --eval-tasks`; the
        # checkpoints take the demo model's tokenizer and vocabulary)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lastword import write_task  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.synth import Shape, make_checkpoint  # noqa: E402
from bench.tinylm import demo_model  # noqa: E402
from streamprune.plan import plan  # noqa: E402

VOCAB = 32000


def print_table(args: argparse.Namespace, rows: list[tuple]) -> None:
    """One row per checkpoint: its size, the measured and the predicted peaks, the time per block."""
    moe = f", {args.family} top-{args.topk}" if args.family == "mixtral" else ""
    tasks = f"; --eval-tasks: a LAMBADA-style task of {args.eval_tasks} sentences" if args.eval_tasks else ""
    print(f"block: hidden {args.hidden}, ffn {args.ffn}{' per expert' if moe else ''}, bf16{moe}; {args.method}, "
          f"{args.nsamples} x {args.seqlen} tokens; device {args.device}; activations {args.offload_activations}"
          f"{tasks}")
    print(f"{'experts':>7} {'depth':>5} {'ckpt GB':>8} {'peak RSS MiB':>13} {'plan MiB':>9} {'plan/meas':>9} "
          f"{'GPU MiB':>8} {'plan GPU':>9} {'s/block':>8}")
    for experts, depth, size, rss, pred, gpu, pgpu, per_block, _ in rows:
        print(f"{experts:>7} {depth:>5} {size / 1e9:>8.2f} {rss / 2**20:>13.0f} {pred / 2**20:>9.0f} {pred / rss:>9.2f} "
              f"{gpu / 2**20:>8.0f} {pgpu / 2**20:>9.0f} {per_block:>8.2f}")
    largest = max(rows, key=lambda r: r[2])
    print(f"peak RSS at the largest checkpoint is {largest[3] / largest[2]:.1%} of its size")
    if args.family == "mixtral" and len(args.experts) > 1:
        few, many = min(args.experts), max(args.experts)
        for depth in args.depths:
            a = next(r[3] for r in rows if r[0] == few and r[1] == depth)
            b = next(r[3] for r in rows if r[0] == many and r[1] == depth)
            print(f"depth {depth}: {many} experts {b / 2**20:.0f} MiB vs {few} experts {a / 2**20:.0f} MiB = {b / a:.3f}x "
                  f"(bound: 1.15x + 50 MB = {(1.15 * a + 50e6) / 2**20:.0f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32, 64])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--family", choices=["llama", "mixtral"], default="llama")
    ap.add_argument("--experts", type=int, nargs="+", default=[8], help="mixtral: routed experts per block (each)")
    ap.add_argument("--topk", type=int, default=2, help="mixtral: experts per token")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload-activations", default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints are generated (needs 2x the largest)")
    ap.add_argument("--eval-tasks", type=int, default=0, metavar="DOCS",
                    help="also score a LAMBADA-style task of DOCS sentences of the demo model's held-out text")
    add_record_option(ap)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="streamprune-membench-", dir=args.workdir))
    calib = work / "calib.npy"
    demo = demo_model()
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"] if args.eval_tasks else VOCAB
    np.save(calib, np.random.default_rng(0).integers(0, vocab, size=args.nsamples * args.seqlen * 4))
    tasks: dict[str, object] = {}
    if args.eval_tasks:
        name = write_task((demo / "test.txt").read_text(encoding="utf-8"), work / "tasks", args.eval_tasks)
        tasks = {"eval_tasks": [name], "include_path": work / "tasks"}
    rows = []
    try:
        for experts, depth in [(e, d) for e in (args.experts if args.family == "mixtral" else [0]) for d in args.depths]:
            model, out = work / f"model-{experts}-{depth}", work / f"out-{experts}-{depth}"
            shape = Shape(args.family, args.hidden, args.ffn, args.heads, args.heads, vocab, experts, args.topk)
            size = make_checkpoint(model, shape, depth)
            if tasks:  # the demo model's tokenizer, whose vocabulary the checkpoint has
                for name in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copyfile(demo / name, model / name)
            predicted = plan(model, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                             offload_activations=args.offload_activations, method=args.method, **tasks)
            cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(model), str(out), "--method", args.method,
                   "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--device", args.device, "--offload-activations", args.offload_activations]
            if tasks:
                cmd += ["--eval-tasks", tasks["eval_tasks"][0], "--include-path", str(tasks["include_path"])]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            wall = time.perf_counter() - start
            report = json.loads((out / "streamprune_report.json").read_text())
            rows.append((experts, depth, size, report["process_peak_rss_bytes"], predicted.host_peak,
                         report["peak_gpu_bytes"], predicted.device_peak, report["wall_seconds"] / depth, wall))
            shutil.rmtree(model)
            shutil.rmtree(out)
            print(f"{experts} experts, depth {depth}: done in {wall:.0f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    with recording(ap, args, ignore=("workdir",)):
        print_table(args, rows)


if __name__ == "__main__":
    main()

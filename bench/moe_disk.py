"""An MoE block's calibration activations on disk (`--offload-activations disk`): bytes read and written per block
and seconds per block, this checkout against another commit.

A random Mixtral-layout checkpoint (one tensor per expert) is pruned with its activations in a file; every read and
write of the activation files is counted (streamprune's positioned reads and writes, `fileio.read_fully` /
`write_fully` as `activations.py` calls them). With `--against COMMIT`, the same job runs on that commit's code (a git
worktree) in a process of its own, and both rows are printed.

    python bench/moe_disk.py                                   # 64 experts top-8, hidden 1024, 64 x 256 tokens
    python bench/moe_disk.py --against 4f4cd9d --record         # before and after, into bench/RESULTS.md
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

ROOT = Path(__file__).resolve().parents[1]


def job(tree: Path, model: Path, calib: Path, out: Path, args: argparse.Namespace) -> dict:
    """Prune `model` with the streamprune of `tree` in this process, counting the activation files' bytes."""
    sys.path.insert(0, str(tree))
    import streamprune
    from streamprune import activations

    counts = {"read": 0, "written": 0}
    read, write = activations.read_fully, activations.write_fully

    def counted_read(fd, view, offset):
        got = read(fd, view, offset)
        counts["read"] += got
        return got

    def counted_write(fd, view, offset):
        counts["written"] += view.nbytes
        return write(fd, view, offset)

    activations.read_fully, activations.write_fully = counted_read, counted_write
    start = time.perf_counter()
    report = streamprune.prune(model, out, calib=calib, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                               offload_activations="disk", method=args.method, sequential=True)
    wall = time.perf_counter() - start
    blocks = report.model["n_layers"]
    fallback = sum(1 for lr in report.layers if lr.expert is not None and lr.role == "ffn_down_exp"
                   and lr.statistics != "routed")
    return {"fallback": fallback, "experts": sum(1 for lr in report.layers if lr.role == "ffn_down_exp"),"read_per_block": counts["read"] / blocks, "written_per_block": counts["written"] / blocks,
            "seconds_per_block": wall / blocks, "buffer": args.nsamples * args.seqlen * args.hidden * 4,
            "commit": subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}


def measure(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.synth import Shape, make_checkpoint
    from tests import tiny

    work = Path(tempfile.mkdtemp(prefix="moe-disk-"))
    try:
        model, calib = work / "model", work / "calib.txt"
        shape = Shape("mixtral", args.hidden, args.ffn, args.heads, args.heads, vocab=tiny.VOCAB, experts=args.experts,
                      topk=args.topk)
        make_checkpoint(model, shape, args.depth)
        (model / "tokenizer.json").write_text(tiny.tokenizer_json())
        calib.write_text(tiny.sample_text(200000))
        rows = []
        trees = [ROOT]
        if args.against:
            tree = work / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.against],
                           check=True, capture_output=True)
            trees.insert(0, tree)
        try:
            for tree in trees:
                keys = ("nsamples", "seqlen", "method", "hidden")
                cmd = [sys.executable, __file__, "--child", str(tree), str(model), str(calib), str(work / "out"),
                       json.dumps({k: getattr(args, k) for k in keys})]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                shutil.rmtree(work / "out", ignore_errors=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[0])],
                               capture_output=True)
        print(f"Mixtral layout, {args.experts} experts top-{args.topk}, hidden {args.hidden}, expert ffn {args.ffn}, "
              f"{args.depth} blocks, bf16; {args.method} --sequential, {args.nsamples} x {args.seqlen} tokens on the CPU, "
              f"--offload-activations disk (one buffer: {rows[0]['buffer'] / 2**20:.0f} MiB)")
        print()
        print("| code | read per block | written per block | read / buffer | s per block | experts on every token |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['commit']} | {r['read_per_block'] / 2**20:,.0f} MiB | {r['written_per_block'] / 2**20:,.0f} MiB"
                  f" | {r['read_per_block'] / r['buffer']:.1f} | {r['seconds_per_block']:.2f} | {r['fallback']} of "
                  f"{r['experts']} |")
        print()
        print("(an expert routed fewer than --moe-min-tokens 128 calibration tokens reads every token's row, twice)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tree, model, calib, out, raw = sys.argv[2:7]
        result = job(Path(tree), Path(model), Path(calib), Path(out), argparse.Namespace(**json.loads(raw)))
        print(json.dumps(result))
        return
    sys.path.insert(0, str(ROOT))
    from bench.results import add_record_option, recording

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--against", default=None, help="a commit to measure beside this checkout")
    add_record_option(ap)
    args = ap.parse_args()
    with recording(ap, args):
        measure(args)


if __name__ == "__main__":
    main()

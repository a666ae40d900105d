"""Time and peak host memory of drawing calibration windows from text files of growing size.

Trains a 32k byte-level BPE tokenizer on Python's bundled help text and standard library sources,
writes text files of the given sizes by repeating that text, and in a fresh process per file either
draws the windows as `streamprune run` does ("drawn") or tokenizes the whole file and hashes it,
as calibration did before (and as `streamprune eval` still reads its data: "whole").

    python bench/calib_draw.py                                  # drawn: 16 MiB, 64 MiB, 1 GiB
    python bench/calib_draw.py --sizes 16 64 --mode whole       # about 150 MiB of memory per MiB of text
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    lib = Path(os.__file__).parent
    docs = [topics[k] for k in sorted(topics)]
    return docs + [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))[:200]]


def prepare(work: Path, sizes: list[int]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=32000, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(work / "tokenizer.json"))
    text = "\n\n".join(docs).encode() + b"\n"
    for mib in sizes:
        repeats, rest = divmod(mib * 2**20, len(text))
        with open(work / f"{mib}MiB.txt", "wb") as f:
            for _ in range(repeats):
                f.write(text)
            f.write(text[: text.rfind(b"\n", 0, rest) + 1])  # whole lines, just under `mib` MiB


def measure(mode: str, data: Path, seqlen: int, nsamples: int) -> None:
    """In this process: the seconds and the peak RSS beyond the imports of one draw."""
    from streamprune.calib import calib_windows, load_tokens

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "drawn":
        calib_windows(data, data.parent, 10**9, seqlen, nsamples, seed=0)
    else:
        load_tokens(data, data.parent, 10**9)
        hashlib.sha256(data.read_bytes()).hexdigest()
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(f"{mode:6} {data.stat().st_size / 2**20:8.0f} {seconds:8.2f} {peak:10.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 1024], help="file sizes in MiB")
    ap.add_argument("--mode", choices=["drawn", "whole"], default="drawn")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one file, in a child process
    add_record_option(ap)
    args = ap.parse_args()
    if args.measure:
        return measure(args.mode, args.measure, args.seqlen, args.nsamples)
    with recording(ap, args):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            prepare(work, args.sizes)
            print(f"{args.nsamples} windows of {args.seqlen} tokens, 32k byte-level BPE")
            print("mode   file MiB  seconds  +RSS MiB")
            for mib in args.sizes:
                child = subprocess.run([sys.executable, __file__, "--mode", args.mode, "--seqlen", str(args.seqlen),
                                        "--nsamples", str(args.nsamples), "--measure", str(work / f"{mib}MiB.txt")],
                                       check=True, stdout=subprocess.PIPE, text=True)
                print(child.stdout, end="", flush=True)  # through this process's stdout, so that --record sees it


if __name__ == "__main__":
    main()

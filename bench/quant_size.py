"""How much smaller a 4-bit compressed-tensors output is: the packed linears against the bf16 tensors they replace.

Writes a random LLaMA-shaped bfloat16 checkpoint, prunes it to 50% with magnitude (no calibration needed; the
sizes do not depend on the method) and 4-bit codes (`--wbits 4 --format compressed-tensors`, group 128, symmetric
and asymmetric), and prints the bytes of the pruned linears as stored in the input and in the output, the ratio,
the whole checkpoint's ratio, and the report's own `packed_bytes` estimate.

    python bench/quant_size.py                                  # hidden 2048, ffn 5632, 2 blocks
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import streamprune  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.synth import Shape, make_checkpoint  # noqa: E402
from streamprune.checkpoint import Checkpoint  # noqa: E402
from streamprune.writer import output_linears  # noqa: E402


def measure(args: argparse.Namespace) -> None:
    """Print the sizes: one row per grid."""
    work = Path(tempfile.mkdtemp(prefix="streamprune-quant-size-"))
    try:
        src = work / "model"
        make_checkpoint(src, Shape("llama", args.hidden, args.ffn, args.heads, args.heads), args.depth, torch.bfloat16)
        dense = Checkpoint(src)
        linears = output_linears(dense)
        dense_linear = sum(dense.tensors[n].nbytes for n in linears)
        dense_total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"llama bf16, hidden {args.hidden}, ffn {args.ffn}, {args.depth} blocks; magnitude 50%, 4-bit, "
              f"group {args.group_size}")
        print(f"{'grid':>6} {'linears in':>12} {'linears out':>12} {'ratio':>7} {'ckpt in':>12} {'ckpt out':>12} "
              f"{'ratio':>7} {'report est.':>12}")
        for sym in (True, False):
            out = work / f"out-{sym}"
            report = streamprune.prune(src, out, method="magnitude", wbits=4, group_size=args.group_size, sym=sym,
                                       format="compressed-tensors")
            written = Checkpoint(out)
            packed = sum(written.tensors[p].nbytes for n in written.layout.encoded for p in written.layout.stored(n))
            total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            estimate = report.quantization["packed_bytes"]
            print(f"{'sym' if sym else 'asym':>6} {dense_linear:>12,} {packed:>12,} {packed / dense_linear:>7.4f} "
                  f"{dense_total:>12,} {total:>12,} {total / dense_total:>7.4f} {estimate:>12,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    add_record_option(ap)
    args = ap.parse_args()
    with recording(ap, args):
        measure(args)


if __name__ == "__main__":
    main()

"""A Qwen3.5-MoE checkpoint stored per expert against the same checkpoint stored fused (Qwen3.5/3.6's BF16 releases:
every expert of a block in one 3-D tensor per projection), each pruned by `streamprune run` in a fresh process.

The model: a random Qwen3.5-MoE of 64 routed experts (top-8, a gated shared expert) in bfloat16, 3 Gated DeltaNet
blocks and 1 of gated attention, saved by transformers both ways (`save_original_format` True and False). Each copy
is pruned with SparseGPT at 50% with --eval on held-out text; the table gives each run's peak RSS (the report's, the
OS's VmHWM), perplexity and time, and whether the two outputs hold the same pruned weights bit for bit (each fused
slice read back as its expert's gate, up and down).

    python bench/fused_experts.py                 # 64 experts, hidden 512
    python bench/fused_experts.py --record        # and into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import demo_model  # noqa: E402


def build(path: Path, args: argparse.Namespace, vocab: int) -> tuple[Path, Path]:
    """The random model saved per expert (`path`/per-expert) and fused (`path`/fused), with the demo's tokenizer."""
    import shutil

    import torch
    import transformers

    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
        linear_value_head_dim=64, moe_intermediate_size=args.ffn, shared_expert_intermediate_size=args.ffn,
        num_experts=args.experts, num_experts_per_tok=8, max_position_embeddings=4096, initializer_range=0.02)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    copies = []
    for name, original in (("per-expert", True), ("fused", False)):
        model.save_pretrained(path / name, save_original_format=original)
        shutil.copyfile(demo_model() / "tokenizer.json", path / name / "tokenizer.json")
        copies.append(path / name)
    return copies[0], copies[1]


def prune(model: Path, out: Path, args: argparse.Namespace) -> tuple[dict, float]:
    demo = demo_model()
    cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(model), str(out), "--sparsity", "0.5",
           "--calib", str(demo / "train.txt"), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--eval", str(demo / "test.txt"), "--eval-nsamples", "16", "--device", "cpu"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return json.loads((out / "streamprune_report.json").read_text()), time.perf_counter() - start


def same_weights(a: Path, b: Path) -> tuple[int, int]:
    """How many of the tensors the model uses (each expert's linears one by one) are equal bit for bit, of all."""
    import torch

    from streamprune.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    names = sorted(ca.location)
    assert names == sorted(cb.location)
    return sum(torch.equal(ca.read(n), cb.read(n)) for n in names), len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=256, help="each expert's width (and the shared expert's)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    add_record_option(ap)
    args = ap.parse_args()
    vocab = json.loads((demo_model() / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="streamprune-fused-") as tmp:
        per_expert, fused = build(Path(tmp), args, vocab)
        rows = []
        for label, model in (("per expert", per_expert), ("fused", fused)):
            size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
            report, wall = prune(model, Path(tmp) / f"out-{model.name}", args)
            rows.append((label, size, report["process_peak_rss_bytes"], report["perplexity"], wall))
        equal, total = same_weights(Path(tmp) / "out-per-expert", Path(tmp) / "out-fused")
    with recording(ap, args):
        print(f"Qwen3.5-MoE, random, bf16: {args.experts} experts of width {args.ffn} (top-8, a shared expert), hidden "
              f"{args.hidden}, 3 Gated DeltaNet blocks + 1 attention; SparseGPT 50%, {args.nsamples} x {args.seqlen} "
              "calibration tokens, --eval on 16 windows; CPU")
        print(f"{'stored':<11} {'ckpt MB':>8} {'peak RSS MiB':>13} {'perplexity':>11} {'s':>6}")
        for label, size, rss, ppl, wall in rows:
            print(f"{label:<11} {size / 1e6:>8.1f} {rss / 2**20:>13.0f} {ppl:>11.4f} {wall:>6.1f}")
        print(f"peak RSS fused / per expert: {rows[1][2] / rows[0][2]:.3f}; perplexities "
              f"{'equal' if rows[0][3] == rows[1][3] else 'differ'}; pruned tensors equal bit for bit: {equal} of {total}")


if __name__ == "__main__":
    main()

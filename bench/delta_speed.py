"""The forward of a Gated DeltaNet block on the CPU: streamprune's block forward against transformers' own decoder
layer (its torch path: the chunked delta rule, flash-linear-attention not installed), on the same weights and input.

One Qwen3.5 decoder layer of linear attention and a dense MLP (random weights, float32) over one window; the best of
--repeats timings of each, run alternately; the two outputs compared. Then the delta rule alone (streamprune's
`delta.delta_rule` against transformers' `torch_chunk_gated_delta_rule`) on the same queries, keys, values, decays and
rates, the part of the block the two compute differently (the projections and the MLP are the same GEMMs).

    python bench/delta_speed.py                   # Qwen3.5-2B's linear attention shapes at 2048 tokens
    python bench/delta_speed.py --record          # and into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--key-heads", type=int, default=16)
    ap.add_argument("--value-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    add_record_option(ap)
    args = ap.parse_args()

    import torch
    import transformers

    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    from streamprune.arch.block import block_forward, positions
    from streamprune.arch.delta import delta_rule
    from streamprune.checkpoint import Checkpoint
    from streamprune.stream import BlockStream

    config = transformers.Qwen3_5TextConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, linear_num_key_heads=args.key_heads,
        linear_num_value_heads=args.value_heads, linear_key_head_dim=args.head_dim,
        linear_value_head_dim=args.head_dim, layer_types=["linear_attention"], max_position_embeddings=args.seqlen)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    layer = model.model.layers[0]
    x = torch.randn(1, args.seqlen, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ckpt = Checkpoint(tmp)
        block = next(iter(BlockStream(ckpt, torch.device("cpu"), range(1))))
        pos = positions(ckpt.config, args.seqlen).of(0)
        with torch.no_grad():
            ours = lambda: block_forward(ckpt.config, block.w, x, pos)  # noqa: E731
            theirs = lambda: layer(x, position_embeddings=None, attention_mask=None)  # noqa: E731
            diff = float((ours() - theirs()).abs().max())
            h, g = args.value_heads, torch.Generator().manual_seed(1)
            q, k = (torch.nn.functional.normalize(torch.randn(1, h, args.seqlen, args.head_dim, generator=g), dim=-1)
                    for _ in range(2))
            v = torch.randn(1, h, args.seqlen, args.head_dim, generator=g)
            decay, rate = -torch.rand(1, h, args.seqlen, generator=g), torch.rand(1, h, args.seqlen, generator=g)
            rule = lambda: delta_rule(q * args.head_dim**-0.5, k, v, decay, rate)  # noqa: E731
            their_rule = lambda: torch_chunk_gated_delta_rule(  # noqa: E731
                *(t.transpose(1, 2) for t in (q, k, v, decay, rate)), use_qk_l2norm_in_kernel=False)[0]
            rule_diff = float((rule() - their_rule().transpose(1, 2)).abs().max())
            times = {"streamprune": [], "transformers": [], "rule": [], "their rule": []}
            for _ in range(args.repeats):  # alternately, so that both see the same machine load
                times["streamprune"].append(best(ours, 1))
                times["transformers"].append(best(theirs, 1))
                times["rule"].append(best(rule, 1))
                times["their rule"].append(best(their_rule, 1))
    with recording(ap, args):
        print(f"one Gated DeltaNet block (Qwen3.5): hidden {args.hidden}, ffn {args.ffn}, {args.key_heads} key / "
              f"{args.value_heads} value heads of {args.head_dim}; 1 x {args.seqlen} tokens, float32, CPU "
              f"({torch.get_num_threads()} threads); best of {args.repeats}")
        ours_s, theirs_s = min(times["streamprune"]), min(times["transformers"])
        print(f"{'forward':<34} {'s':>7}")
        print(f"{'streamprune block_forward':<34} {ours_s:>7.3f}")
        print(f"{'transformers Qwen3_5DecoderLayer':<34} {theirs_s:>7.3f}")
        print(f"streamprune / transformers: {ours_s / theirs_s:.2f}; outputs differ by at most {diff:.1e}")
        rule_s, their_rule_s = min(times["rule"]), min(times["their rule"])
        print(f"{'streamprune delta_rule':<34} {rule_s:>7.3f}")
        print(f"{'transformers torch_chunk_gated_delta_rule':<34} {their_rule_s:>7.3f}")
        print(f"the delta rule alone, streamprune / transformers: {rule_s / their_rule_s:.2f}; outputs differ by at "
              f"most {rule_diff:.1e}")


if __name__ == "__main__":
    main()

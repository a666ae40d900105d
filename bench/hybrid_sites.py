"""Prune Gated DeltaNet's decay and rate projections, or keep them as read? Measured on a trained hybrid model.

A linear-attention block's `in_proj_a` and `in_proj_b` (Qwen3-Next: `in_proj_ba`) give each value head its decay
(how fast its state forgets) and its rate (how much each token corrects it): a few rows each, 0.4% of a Qwen3.5
block's linear-attention weights. streamprune copies them as read, as it copies routers. This script measures the
alternative on the Qwen3.5-shaped model `bench/tinylm.py --hybrid` trains (3 Gated DeltaNet blocks, 1 attention):
SparseGPT 50% as streamprune runs it, then the same output with every block's a and b projections pruned too
(SparseGPT 50% on the same input as the block's other projections, block by block on the model as pruned so far),
and, apart, the dense model with only a and b pruned. Held-out perplexity on 128-token windows, as the demo's.

    python bench/hybrid_sites.py                  # trains the hybrid first (once, then cached)
    python bench/hybrid_sites.py --record         # and into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import TINYHYBRID, build_tiny_lm  # noqa: E402

SEQLEN, NSAMPLES, SEED = 128, 64, 0
RATE_DECAY = ("linear_attn.in_proj_a", "linear_attn.in_proj_b")


def prune_rate_and_decay(model, windows):
    """Every linear-attention block's a and b projections pruned by SparseGPT at 50% from their shared input over the
    calibration windows, block by block (each block's input through the blocks pruned before it), in place."""
    import torch

    from streamprune.pruners import Pattern, make_pruner

    for block in model.model.layers:
        if not hasattr(block, "linear_attn"):  # an attention block
            continue
        seen = []
        target = block.get_submodule(RATE_DECAY[0])
        hook = target.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
        with torch.no_grad():
            model(windows, use_cache=False)
        hook.remove()
        pruner = make_pruner("sparsegpt", target.in_features, torch.device("cpu"), 0.5, Pattern.parse("unstructured"))
        for x in seen:
            pruner.add_batch(x)
        for name in RATE_DECAY:
            linear = block.get_submodule(name)
            with torch.no_grad():
                linear.weight.copy_(pruner.prune(linear.weight.detach()).weight)
        pruner.free()


def perplexity(model, windows) -> float:
    import math

    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = model(batch, use_cache=False).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_record_option(ap)
    args = ap.parse_args()

    import torch
    import transformers

    import streamprune
    from streamprune.calib import calib_windows, eval_windows, load_tokens

    lm = build_tiny_lm(recipe=TINYHYBRID)
    torch.manual_seed(SEED)
    calib = calib_windows(lm / "train.txt", lm, 10**9, SEQLEN, NSAMPLES, SEED)
    test = eval_windows(load_tokens(lm / "test.txt", lm, 10**9), SEQLEN)
    load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    dense = load(lm)
    linear = [block for block in dense.model.layers if hasattr(block, "linear_attn")]
    share = sum(block.get_submodule(n).weight.numel() for block in linear for n in RATE_DECAY) / \
        sum(m.weight.numel() for block in linear for m in block.linear_attn.modules() if isinstance(m, torch.nn.Linear))
    rows = [("dense", perplexity(dense, test))]
    alone = load(lm)
    prune_rate_and_decay(alone, calib)
    rows.append(("a and b alone, 50%", perplexity(alone, test)))
    with tempfile.TemporaryDirectory() as tmp:
        streamprune.prune(lm, Path(tmp) / "out", calib=lm / "train.txt", nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED,
                          device="cpu")
        kept = load(Path(tmp) / "out")
        rows.append(("SparseGPT 50%, a and b kept (streamprune)", perplexity(kept, test)))
        prune_rate_and_decay(kept, calib)
        rows.append(("SparseGPT 50%, a and b pruned too", perplexity(kept, test)))
    with recording(ap, args):
        print(f"{TINYHYBRID.folder} (bench/tinylm.py --hybrid): held-out perplexity, {test.shape[0]} windows of "
              f"{SEQLEN} tokens; calibration {NSAMPLES} x {SEQLEN} tokens of the training text; a and b are "
              f"{share:.2%} of the linear-attention blocks' linear weights")
        print(f"{'model':<44} {'perplexity':>10} {'change':>8}")
        for label, ppl in rows:
            print(f"{label:<44} {ppl:>10.3f} {ppl - rows[0][1]:>+8.3f}")


if __name__ == "__main__":
    main()

"""Peak host memory of `streamprune run` against model depth, measured and as `streamprune plan` predicts.

Generates random LLaMA-shaped bf16 checkpoints of one block shape at increasing depth, prunes each
in a fresh process, and prints: depth, checkpoint size, measured peak RSS (the OS's VmHWM, file-backed
pages included), the planner's prediction, and time per block.

    python bench/memory.py                       # depths 4 16 32, hidden 2048, ffn 8192 (4.5 GB at 32)
    python bench/memory.py --depths 2 4 --hidden 512 --ffn 1376      # a quick look
    python bench/memory.py --device cuda         # also reports peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamprune.checkpoint import write_safetensors  # noqa: E402
from streamprune.plan import plan  # noqa: E402

VOCAB = 32000


def make_checkpoint(path: Path, depth: int, hidden: int, ffn: int, heads: int, shard_blocks: int = 8) -> int:
    """A random bf16 LLaMA checkpoint written tensor by tensor; returns its size in bytes."""
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": depth, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)

    def rand(shape: tuple[int, ...], scale: float):
        return lambda: (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)

    def ones(shape: tuple[int, ...]):
        return lambda: torch.ones(shape, dtype=torch.bfloat16)

    shards: list[dict] = [{
        "model.embed_tokens.weight": (torch.bfloat16, (VOCAB, hidden), rand((VOCAB, hidden), 0.02)),
        "model.norm.weight": (torch.bfloat16, (hidden,), ones((hidden,))),
        "lm_head.weight": (torch.bfloat16, (VOCAB, hidden), rand((VOCAB, hidden), 0.02)),
    }]
    for b in range(depth):
        if b % shard_blocks == 0:
            shards.append({})
        p = f"model.layers.{b}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (ffn, hidden)), ("mlp.up_proj", (ffn, hidden)),
                            ("mlp.down_proj", (hidden, ffn))):
            shards[-1][p + name + ".weight"] = (torch.bfloat16, shape, rand(shape, 1 / math.sqrt(shape[1])))
        for name in ("input_layernorm", "post_attention_layernorm"):
            shards[-1][p + name + ".weight"] = (torch.bfloat16, (hidden,), ones((hidden,)))
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload-activations", default="auto")
    ap.add_argument("--workdir", type=Path, default=None, help="where checkpoints are generated (needs 2x the largest)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="streamprune-membench-", dir=args.workdir))
    calib = work / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, VOCAB, size=args.nsamples * args.seqlen * 4))
    rows = []
    try:
        for depth in args.depths:
            model, out = work / f"model-{depth}", work / f"out-{depth}"
            size = make_checkpoint(model, depth, args.hidden, args.ffn, args.heads)
            predicted = plan(model, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                             offload_activations=args.offload_activations, method=args.method)
            cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(model), str(out), "--method", args.method,
                   "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                   "--device", args.device, "--offload-activations", args.offload_activations]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            wall = time.perf_counter() - start
            report = json.loads((out / "streamprune_report.json").read_text())
            rows.append((depth, size, report["process_peak_rss_bytes"], predicted.host_peak,
                         report["peak_gpu_bytes"], predicted.device_peak, report["wall_seconds"] / depth, wall))
            shutil.rmtree(model)
            shutil.rmtree(out)
            print(f"depth {depth}: done in {wall:.0f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"block: hidden {args.hidden}, ffn {args.ffn}, bf16; {args.method}, {args.nsamples} x {args.seqlen} "
          f"tokens; device {args.device}; activations {args.offload_activations}")
    print(f"{'depth':>5} {'ckpt GB':>8} {'peak RSS MiB':>13} {'plan MiB':>9} {'plan/meas':>9} "
          f"{'GPU MiB':>8} {'plan GPU':>9} {'s/block':>8}")
    for depth, size, rss, pred, gpu, pgpu, per_block, _ in rows:
        print(f"{depth:>5} {size / 1e9:>8.2f} {rss / 2**20:>13.0f} {pred / 2**20:>9.0f} {pred / rss:>9.2f} "
              f"{gpu / 2**20:>8.0f} {pgpu / 2**20:>9.0f} {per_block:>8.2f}")
    largest = max(rows, key=lambda r: r[1])
    print(f"peak RSS at the largest depth is {largest[2] / largest[1]:.1%} of its checkpoint size")


if __name__ == "__main__":
    main()

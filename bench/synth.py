"""Random checkpoints of a given block shape, written tensor by tensor (no model is ever materialized).

    python bench/synth.py /tmp/opt175b --family opt --hidden 12288 --ffn 49152 --heads 96 --vocab 50272 \
        --depth 96 --dtype float16 --headers-only      # 349 GB apparent size, no disk used: for `plan`
    python bench/synth.py /tmp/llama70b --hidden 8192 --ffn 28672 --heads 64 --kv-heads 8 --depth 80 --headers-only
    python bench/synth.py /tmp/qwen3-235b-like --family mixtral --hidden 4096 --ffn 1536 --experts 128 --topk 8 \
        --heads 64 --kv-heads 4 --depth 94 --headers-only   # Mixtral layout, one tensor per expert
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from streamprune.tensorfile import safetensors_header, write_safetensors


@dataclass(frozen=True)
class Shape:
    family: str  # "llama", "opt" or "mixtral" (then `ffn` is each expert's width)
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    experts: int = 0  # mixtral: routed experts per block
    topk: int = 2  # mixtral: experts per token

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def block_tensors(shape: Shape, b: int) -> dict[str, tuple[int, ...]]:
    d, f, kv = shape.hidden, shape.ffn, shape.kv_heads * shape.head_dim
    if shape.family == "opt":
        p = f"model.decoder.layers.{b}."
        linears = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                   "self_attn.out_proj": (d, d), "fc1": (f, d), "fc2": (d, f)}
        out = {p + k + ".weight": s for k, s in linears.items()}
        out.update({p + k + ".bias": (s[0],) for k, s in linears.items()})
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            out[p + norm + ".weight"] = (d,)
            out[p + norm + ".bias"] = (d,)
        return out
    p = f"model.layers.{b}."
    linears = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
               "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    if shape.family == "mixtral":
        for k in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            del linears[k]
        linears["block_sparse_moe.gate"] = (shape.experts, d)
        for e in range(shape.experts):
            moe = f"block_sparse_moe.experts.{e}."
            linears.update({moe + "w1": (f, d), moe + "w3": (f, d), moe + "w2": (d, f)})
    out = {p + k + ".weight": s for k, s in linears.items()}
    out.update({p + n + ".weight": (d,) for n in ("input_layernorm", "post_attention_layernorm")})
    return out


def config(shape: Shape, depth: int, dtype: str) -> dict:
    if shape.family == "opt":
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": shape.hidden,
                "ffn_dim": shape.ffn, "num_hidden_layers": depth, "num_attention_heads": shape.heads,
                "vocab_size": shape.vocab, "max_position_embeddings": 2048, "word_embed_proj_dim": shape.hidden,
                "do_layer_norm_before": True, "activation_function": "relu", "tie_word_embeddings": True,
                "torch_dtype": dtype}
    if shape.family == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": shape.hidden,
                "intermediate_size": shape.ffn, "num_hidden_layers": depth, "num_attention_heads": shape.heads,
                "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": shape.experts,
                "num_experts_per_tok": shape.topk, "tie_word_embeddings": False, "torch_dtype": dtype}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
            "intermediate_size": shape.ffn, "num_hidden_layers": depth, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": dtype}


def make_checkpoint(path: Path, shape: Shape, depth: int, dtype: torch.dtype = torch.bfloat16,
                    shard_blocks: int = 8, seed: int = 0, headers_only: bool = False) -> int:
    """Write a random checkpoint of `depth` blocks; returns its size in bytes.

    With `headers_only`, each shard is its header followed by a hole of the data's length (a sparse
    file: no disk space, reads give zeros): enough for `streamprune plan` on any model size."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config(shape, depth, str(dtype).removeprefix("torch.")), indent=2))
    gen = torch.Generator().manual_seed(seed)

    def entry(name: str, s: tuple[int, ...]):
        if len(s) == 1:  # norms and biases
            fill = 0.0 if name.endswith(".bias") else 1.0
            return (dtype, s, lambda: torch.full(s, fill, dtype=dtype))
        scale = 0.02 if "embed" in name or "lm_head" in name else 1 / math.sqrt(s[1])
        return (dtype, s, lambda: (torch.randn(s, generator=gen) * scale).to(dtype))

    d, v = shape.hidden, shape.vocab
    if shape.family == "opt":
        globals_ = {"model.decoder.embed_tokens.weight": (v, d), "model.decoder.embed_positions.weight": (2050, d),
                    "model.decoder.final_layer_norm.weight": (d,), "model.decoder.final_layer_norm.bias": (d,)}
    else:
        globals_ = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    shards = [{n: entry(n, s) for n, s in globals_.items()}]
    for b in range(depth):
        if b % shard_blocks == 0:
            shards.append({})
        shards[-1].update({n: entry(n, s) for n, s in block_tensors(shape, b).items()})
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if headers_only:
            header, nbytes = safetensors_header({n: (dt, s) for n, (dt, s, _) in shard.items()})
            with open(path / name, "wb") as f:
                f.write(header)
                f.truncate(len(header) + nbytes)
        else:
            write_safetensors(path / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=["llama", "opt", "mixtral"], default="llama")
    ap.add_argument("--experts", type=int, default=8, help="mixtral: routed experts per block")
    ap.add_argument("--topk", type=int, default=2, help="mixtral: experts per token")
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--ffn", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--headers-only", action="store_true", help="sparse shards: headers and holes, for `streamprune plan`")
    args = ap.parse_args()
    shape = Shape(args.family, args.hidden, args.ffn, args.heads, args.kv_heads or args.heads, args.vocab,
                  args.experts if args.family == "mixtral" else 0, args.topk)
    size = make_checkpoint(args.out, shape, args.depth, getattr(torch, args.dtype), headers_only=args.headers_only)
    print(f"wrote {args.out}: {size / 1e9:.2f} GB of shards{' (sparse)' if args.headers_only else ''}")


if __name__ == "__main__":
    main()

"""`streamprune plan` of the published giants, from checkpoints of their exact shapes made of headers alone.

Each checkpoint is written as its released layout with every shard a header followed by a hole: no disk is used and
nothing is read, since the plan reads headers only. DeepSeek-V3 (671B): float8 e4m3 linears with float32 scales per
128 x 128 tile, bfloat16 embeddings, norms and routers, the multi-token-prediction layer, one shard per block.
Qwen3.6-35B-A3B and Qwen3.5-397B-A17B: bfloat16, the image-text model's names and shapes as transformers builds them
(the vision tower included; each block's 256 or 512 routed experts fused in two 3-D tensors), and an MTP layer.
gpt-oss-120b: bfloat16 attention, sinks, router and biases, its 128 experts per block fused in MXFP4.

    python bench/giants.py                 # each, on a 24 GiB GPU, 128 x 2048 calibration tokens
    python bench/giants.py --record        # and into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from streamprune.options import parse_size  # noqa: E402
from streamprune.plan import plan  # noqa: E402
from streamprune.tensorfile import safetensors_header  # noqa: E402

FP8, BF16, F32 = torch.float8_e4m3fn, torch.bfloat16, torch.float32

# DeepSeek-V3's config.json as released (the keys the model reads)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def linear(out: dict, name: str, rows: int, cols: int) -> None:
    """A linear as released: float8 weight and its float32 scale per 128 x 128 tile."""
    out[name + ".weight"] = (FP8, (rows, cols))
    out[name + ".weight_scale_inv"] = (F32, (math.ceil(rows / 128), math.ceil(cols / 128)))


def deepseek_block(c: dict, b: int) -> dict:
    d, p, out = c["hidden_size"], f"model.layers.{b}.", {}
    heads, nope, rope, dv = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    linear(out, p + "self_attn.q_a_proj", c["q_lora_rank"], d)
    linear(out, p + "self_attn.q_b_proj", heads * (nope + rope), c["q_lora_rank"])
    linear(out, p + "self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + rope, d)
    linear(out, p + "self_attn.kv_b_proj", heads * (nope + dv), c["kv_lora_rank"])
    linear(out, p + "self_attn.o_proj", d, heads * dv)
    for norm, width in (("input_layernorm", d), ("post_attention_layernorm", d),
                        ("self_attn.q_a_layernorm", c["q_lora_rank"]), ("self_attn.kv_a_layernorm", c["kv_lora_rank"])):
        out[p + norm + ".weight"] = (BF16, (width,))
    if b < c["first_k_dense_replace"]:
        f = c["intermediate_size"]
        linear(out, p + "mlp.gate_proj", f, d)
        linear(out, p + "mlp.up_proj", f, d)
        linear(out, p + "mlp.down_proj", d, f)
        return out
    f, n = c["moe_intermediate_size"], c["n_routed_experts"]
    out[p + "mlp.gate.weight"] = (BF16, (n, d))
    out[p + "mlp.gate.e_score_correction_bias"] = (F32, (n,))
    for e in [f"experts.{x}" for x in range(n)] + ["shared_experts"]:
        width = f * (c["n_shared_experts"] if e == "shared_experts" else 1)
        linear(out, p + f"mlp.{e}.gate_proj", width, d)
        linear(out, p + f"mlp.{e}.up_proj", width, d)
        linear(out, p + f"mlp.{e}.down_proj", d, width)
    return out


def deepseek_mtp(c: dict, b: int) -> dict:
    """The multi-token-prediction layer as released: a block plus its own embedding, head, projection and norms."""
    d, p = c["hidden_size"], f"model.layers.{b}."
    out = deepseek_block(c, b)
    out.update({p + "embed_tokens.weight": (BF16, (c["vocab_size"], d)), p + "enorm.weight": (BF16, (d,)),
                p + "hnorm.weight": (BF16, (d,)), p + "shared_head.norm.weight": (BF16, (d,)),
                p + "shared_head.head.weight": (BF16, (c["vocab_size"], d))})
    linear(out, p + "eh_proj", d, 2 * d)
    return out


def write(path: Path, config: dict, shards: list[dict]) -> int:
    """Shards of headers followed by holes (sparse files), the index and config.json; the apparent size."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, nbytes = safetensors_header(shard)
        with open(path / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + nbytes)
        weight_map.update(dict.fromkeys(shard, name))
        total += len(header) + nbytes
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def deepseek_v3(path: Path) -> int:
    c = DEEPSEEK_V3
    d, v, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    shards = [{"model.embed_tokens.weight": (BF16, (v, d)), "model.norm.weight": (BF16, (d,)),
               "lm_head.weight": (BF16, (v, d))}]
    shards += [deepseek_block(c, b) for b in range(n)]
    shards += [deepseek_mtp(c, b) for b in range(n, n + c["num_nextn_predict_layers"])]
    return write(path, c, shards)


# Qwen3.6-35B-A3B's language model (Qwen3.5-35B-A3B's architecture) and Qwen3.5-397B-A17B's: hidden, blocks (three
# Gated DeltaNet to one gated attention), attention heads, key-value heads, linear attention's key and value heads,
# routed experts, experts per token
QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
             "mrope_interleaved": True}
QWEN = {
    "Qwen3.6-35B-A3B": dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, linear_num_value_heads=32,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
                            num_experts_per_tok=8),
    "Qwen3.5-397B-A17B": dict(hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, linear_num_value_heads=64,
                              moe_intermediate_size=1024, shared_expert_intermediate_size=1024, num_experts=512,
                              num_experts_per_tok=10),
}


def qwen35(path: Path, sizes: dict) -> int:
    """A Qwen3.5-MoE image-text checkpoint: every tensor transformers' model holds (built on the meta device), bf16,
    its experts fused as released, one shard per block, the vision tower and the globals in the first, and an MTP
    layer (a copy of an attention block's names under `mtp.layers.0`, its projection and norms)."""
    import transformers

    text = dict(vocab_size=248320, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, max_position_embeddings=262144,
                rope_parameters=QWEN_ROPE, mtp_num_hidden_layers=1, **sizes)
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config={"out_hidden_size": sizes["hidden_size"]})
    with torch.device("meta"):
        model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    n, d = sizes["num_hidden_layers"], sizes["hidden_size"]
    shards: list[dict] = [{} for _ in range(n + 2)]
    for name, t in model.state_dict().items():
        block = name.split("layers.")[1].split(".")[0] if ".language_model.layers." in name else None
        shards[0 if block is None else int(block) + 1][name] = (BF16, tuple(t.shape))
    attention = n - 1  # the last block is an attention block
    prefix = f"model.language_model.layers.{attention}."
    shards[-1] = {name.replace(prefix, "mtp.layers.0."): meta for name, meta in shards[attention + 1].items()}
    shards[-1].update({"mtp.fc.weight": (BF16, (d, 2 * d)), "mtp.norm.weight": (BF16, (d,)),
                       "mtp.pre_fc_norm_embedding.weight": (BF16, (d,)), "mtp.pre_fc_norm_hidden.weight": (BF16, (d,))})
    raw = config.to_dict()
    raw["text_config"]["mtp_num_hidden_layers"] = 1
    return write(path, raw, shards)


# gpt-oss-120b's config.json as released (the keys the model reads)
GPT_OSS_120B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
    "head_dim": 64, "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "swiglu_limit": 7.0, "attention_bias": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096}, "rope_theta": 150000,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}


def gpt_oss(path: Path) -> int:
    """gpt-oss-120b as released: bf16 attention (with its sinks), router and biases, the experts' projections in
    MXFP4 (uint8 blocks of 16 bytes and e8m0 scales per 32 inputs, outputs first), one shard per block."""
    c = GPT_OSS_120B
    d, f, n, e = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_local_experts"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    U8 = torch.uint8
    shards = [{"model.embed_tokens.weight": (BF16, (c["vocab_size"], d)), "model.norm.weight": (BF16, (d,)),
               "lm_head.weight": (BF16, (c["vocab_size"], d))}]
    for b in range(n):
        p = f"model.layers.{b}."
        shard = {p + "input_layernorm.weight": (BF16, (d,)), p + "post_attention_layernorm.weight": (BF16, (d,)),
                 p + "self_attn.sinks": (BF16, (c["num_attention_heads"],)), p + "mlp.router.weight": (BF16, (e, d)),
                 p + "mlp.router.bias": (BF16, (e,))}
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shard.update({p + f"self_attn.{name}.weight": (BF16, (rows, d)), p + f"self_attn.{name}.bias": (BF16, (rows,))})
        shard.update({p + "self_attn.o_proj.weight": (BF16, (d, q)), p + "self_attn.o_proj.bias": (BF16, (d,))})
        for name, rows, cols in (("gate_up_proj", 2 * f, d), ("down_proj", d, f)):
            shard.update({p + f"mlp.experts.{name}_blocks": (U8, (e, rows, cols // 32, 16)),
                          p + f"mlp.experts.{name}_scales": (U8, (e, rows, cols // 32)),
                          p + f"mlp.experts.{name}_bias": (BF16, (e, rows))})
        shards.append(shard)
    return write(path, c, shards)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


MODELS = {"DeepSeek-V3": (deepseek_v3, "FP8, block scales", "FP8 out"),
          "gpt-oss-120b": (gpt_oss, "MXFP4 experts", "MXFP4 out"),
          **{name: (lambda path, sizes=sizes: qwen35(path, sizes), "BF16, experts fused", "BF16 out")
             for name, sizes in QWEN.items()}}


def measure(args: argparse.Namespace) -> None:
    for name in args.models:
        build, stored, out = MODELS[name]
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            model = Path(tmp) / name
            size = build(model)
            print(f"{name} as released ({stored}): {size / 1e9:.1f} GB in {len(list(model.glob('*.safetensors')))}"
                  f" shards (sparse files: headers only); --nsamples {args.nsamples} --seqlen {args.seqlen} "
                  f"--device cuda --max-gpu-memory {args.gpu}")
            print()
            table(model, args, out)
            print()


def table(model: Path, args: argparse.Namespace, out: str) -> None:
    print(f"| {'run':<46} | placement | batch | GPU peak GiB | host peak GiB | read GB | written GB |")
    print(f"|{'-' * 48}|-----------|-------|--------------|---------------|---------|------------|")
    runs = [(f"SparseGPT 50%, {out}", {}),
            ("SparseGPT 50%, activations on disk", {"offload_activations": "disk"}),
            (f"Wanda 50%, {out}", {"method": "wanda"}),
            ("REAP 50% + SparseGPT 50%, activations on disk", {"prune_experts": 0.5, "offload_activations": "disk"})]
    for label, extra in runs:
        try:
            p = plan(model, nsamples=args.nsamples, seqlen=args.seqlen, device="cuda",
                     max_gpu_memory=parse_size(args.gpu), **extra)
        except Exception as e:  # a refusal is a result too
            print(f"| {label:<46} | refused: {str(e)[:120]} |")
            continue
        print(f"| {label:<46} | {p.placement:<9} | {p.batch:>5} | {gib(p.device_peak):>12} | {gib(p.host_peak):>13} "
              f"| {p.read_bytes / 1e9:>7.0f} | {p.output_bytes / 1e9:>10.0f} |")
        if p.disk_read_per_block:
            print(f"|   activations on disk, per block: {p.disk_read_per_block / 1e9:.0f} GB read, "
                  f"{p.disk_written_per_block / 1e9:.0f} GB written (every expert routed at least "
                  "--moe-min-tokens tokens) |")
        if args.consumers and not extra:
            for what, nbytes, where in p.consumers[:8]:
                print(f"    {where:<6} {gib(nbytes):>7} GiB  {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--gpu", default="24GiB", help="--max-gpu-memory of the planned run")
    ap.add_argument("--consumers", action="store_true", help="also the largest consumers of the first run")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--tmp", default=None, help="where the sparse checkpoint is written (default: the system's)")
    add_record_option(ap)
    args = ap.parse_args()
    with recording(ap, args):
        measure(args)


if __name__ == "__main__":
    main()

"""Phi-3 and Phi-3.5 (`phi3`): the LLaMA block with q, k, v fused into one `qkv_proj` (all query rows, then key rows,
then value rows) and gate and up fused into one `gate_up_proj` (gate rows, then up rows); LongRoPE."""

from __future__ import annotations

from typing import Any

from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int
from streamprune.arch.llama import rope_parameters
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec

LEGACY_LONGROPE = ("su", "yarn")  # what early Phi-3 configs call LongRoPE (transformers renames both)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in LEGACY_LONGROPE:
        raw = {**raw, "rope_scaling": {**scaling, "rope_type": "longrope"}}
    return ModelConfig(
        family="phi3",
        model_type="phi3",
        vocab_size=get_int(raw, "vocab_size"),
        hidden_size=get_int(raw, "hidden_size"),
        n_layers=get_int(raw, "num_hidden_layers"),
        n_heads=get_int(raw, "num_attention_heads"),
        n_kv_heads=get_int(raw, "num_key_value_heads", default=0),
        head_dim=get_int(raw, "head_dim", default=0),
        ffn_dim=get_int(raw, "intermediate_size"),
        norm="rms",
        norm_eps=get_float(raw, "rms_norm_eps", 1e-5),
        act=raw.get("hidden_act", "silu"),
        gated=True,
        gate_up_fused=True,
        pos="rope",
        rope=rope_parameters(raw),
        qkv_layout="concat",
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", False),
        max_positions=get_int(raw, "max_position_embeddings", default=4096),
        sliding_window=raw.get("sliding_window"),
        raw=raw,
    )


SPEC = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    base_prefix="model.",
    parse_config=parse_config,
    tensors={
        Role.TOKEN_EMBD: "embed_tokens",
        Role.OUTPUT_NORM: "norm",
        Role.OUTPUT: "lm_head",
        Role.ATTN_NORM: "layers.{bid}.input_layernorm",
        Role.ATTN_QKV: "layers.{bid}.self_attn.qkv_proj",
        Role.ATTN_OUT: "layers.{bid}.self_attn.o_proj",
        Role.FFN_NORM: "layers.{bid}.post_attention_layernorm",
        Role.FFN_GATE_UP: "layers.{bid}.mlp.gate_up_proj",
        Role.FFN_DOWN: "layers.{bid}.mlp.down_proj",
    },
)

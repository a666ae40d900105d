"""Phi-3 and Phi-3.5 (`phi3`): the LLaMA block with q, k, v fused into one `qkv_proj` (all query rows, then key rows,
then value rows) and gate and up fused into one `gate_up_proj` (gate rows, then up rows); LongRoPE."""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune.arch import llama
from streamprune.arch.config import ModelConfig
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec

LEGACY_LONGROPE = ("su", "yarn")  # what early Phi-3 configs call LongRoPE (transformers renames both)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in LEGACY_LONGROPE:
        raw = {**raw, "rope_scaling": {**scaling, "rope_type": "longrope"}}
    base = llama.parse_config({"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, **raw})  # Phi-3's defaults
    # q/k/v and gate/up are each one matrix; Phi-3 has no attention or MLP biases
    return dataclasses.replace(base, family="phi3", gate_up_fused=True, qkv_layout="concat", qkv_bias=False,
                               out_bias=False, mlp_bias=False)


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

"""gpt-oss (`gpt_oss`: gpt-oss-20b, gpt-oss-120b), as published with its routed experts in MXFP4.

LLaMA's attention with q/k/v/o biases, a learned sink logit per head that joins each query's softmax (`sinks`), and
blocks alternating a 128-token sliding window with full attention (`layer_types`, else every other block slides,
the first one sliding); YaRN RoPE. Every block routes: a router with a bias (`mlp.router`) whose top `experts_per_tok`
logits are softmaxed, and experts with biases whose SwiGLU is clamped (gate at most `swiglu_limit`, up within
[-limit, limit], gate * sigmoid(`swiglu_alpha` * gate) * (up + 1)). The experts are stored fused (`fused.GPT_OSS`:
gate and up interleaved, as x @ W reads them, biases beside), in MXFP4 as released (formats.Mxfp4Format); the model
sees each expert's gate, up and down projections under `mlp.experts.{e}.*_proj` names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune import fused
from streamprune.arch import llama
from streamprune.arch.config import ModelConfig, get_float, get_int, get_layer_types
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    base = llama.parse_config(raw)
    width = get_int(raw, "intermediate_size")
    return dataclasses.replace(
        base, family="gpt_oss", attn_sinks=True,
        layer_types=get_layer_types(raw, base.n_layers, lambda i: i % 2 == 0),
        n_experts=get_int(raw, "num_local_experts", "num_experts"), experts_per_tok=get_int(raw, "num_experts_per_tok"),
        expert_ffn_dim=width, router="topk_softmax", router_logit_bias=True, expert_bias=True,
        swiglu_limit=get_float(raw, "swiglu_limit", 7.0), swiglu_alpha=get_float(raw, "swiglu_alpha", 1.702))


SPEC = ArchSpec(
    name="gpt_oss",
    model_types=("gpt_oss",),
    base_prefix="model.",
    parse_config=parse_config,
    tensors={
        **{role: name for role, name in llama.SPEC.tensors.items()
           if role not in (Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN, Role.ROPE_FREQS)},
        Role.ATTN_SINKS: "layers.{bid}.self_attn",  # its parameter `sinks`
        Role.FFN_GATE_INP: "layers.{bid}.mlp.router",
        # each expert's projections, as the model sees them (the checkpoint stores every expert's fused)
        Role.FFN_GATE_EXP: "layers.{bid}.mlp.experts.{xid}.gate_proj",
        Role.FFN_UP_EXP: "layers.{bid}.mlp.experts.{xid}.up_proj",
        Role.FFN_DOWN_EXP: "layers.{bid}.mlp.experts.{xid}.down_proj",
    },
    fused=fused.GPT_OSS,
)

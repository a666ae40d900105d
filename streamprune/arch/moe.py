"""Mixture-of-Experts families on the LLaMA block: Mixtral, Qwen2-MoE (with a gated shared expert), Qwen3-MoE.

The attention half is LLaMA's (Qwen3-MoE adds its per-head q/k norms); the MLP of each MoE block is a router
over `n_experts` gated MLPs, one tensor per expert in the checkpoint (names carry `{xid}`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune.arch import llama
from streamprune.arch.config import ModelConfig, get_bool, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """LLaMA's fields, then the experts: Mixtral names them `num_local_experts`, Qwen `num_experts`."""
    base = llama.parse_config(raw)
    model_type = base.model_type
    n_layers = base.n_layers
    if model_type == "mixtral":
        n_experts = get_int(raw, "num_local_experts", "num_experts")
        expert_ffn, shared_ffn, norm_topk, dense = base.ffn_dim, 0, True, frozenset[int]()
    else:
        n_experts = get_int(raw, "num_experts", "num_local_experts")  # transformers 5 writes the latter
        expert_ffn = get_int(raw, "moe_intermediate_size")
        shared_ffn = get_int(raw, "shared_expert_intermediate_size", default=0)
        norm_topk = get_bool(raw, "norm_topk_prob", False)
        step = get_int(raw, "decoder_sparse_step", default=1)
        only = raw.get("mlp_only_layers") or []
        if step < 1 or not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise CheckpointError(f"config.json: decoder_sparse_step={step!r} / mlp_only_layers={only!r} are not "
                                  "a positive step and a list of block indices")
        dense = frozenset(b for b in range(n_layers) if b in only or (b + 1) % step)
    return dataclasses.replace(
        base, n_experts=n_experts, experts_per_tok=get_int(raw, "num_experts_per_tok"), expert_ffn_dim=expert_ffn,
        shared_ffn_dim=shared_ffn, norm_topk_prob=norm_topk, dense_layers=dense)


ATTENTION = {role: name for role, name in llama.SPEC.tensors.items()
             if role not in (Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN)}

MIXTRAL = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    base_prefix="model.",
    parse_config=parse_config,
    tensors={
        **ATTENTION,
        Role.FFN_GATE_INP: "layers.{bid}.block_sparse_moe.gate",
        Role.FFN_GATE_EXP: "layers.{bid}.block_sparse_moe.experts.{xid}.w1",
        Role.FFN_DOWN_EXP: "layers.{bid}.block_sparse_moe.experts.{xid}.w2",
        Role.FFN_UP_EXP: "layers.{bid}.block_sparse_moe.experts.{xid}.w3",
    },
)

QWEN_MOE = ArchSpec(
    name="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe"),
    base_prefix="model.",
    parse_config=parse_config,
    tensors={
        **llama.SPEC.tensors,  # blocks listed in mlp_only_layers keep a dense MLP; Qwen3-MoE's q/k norms
        Role.FFN_GATE_INP: "layers.{bid}.mlp.gate",
        Role.FFN_GATE_EXP: "layers.{bid}.mlp.experts.{xid}.gate_proj",
        Role.FFN_UP_EXP: "layers.{bid}.mlp.experts.{xid}.up_proj",
        Role.FFN_DOWN_EXP: "layers.{bid}.mlp.experts.{xid}.down_proj",
        Role.FFN_GATE_SHEXP: "layers.{bid}.mlp.shared_expert.gate_proj",
        Role.FFN_UP_SHEXP: "layers.{bid}.mlp.shared_expert.up_proj",
        Role.FFN_DOWN_SHEXP: "layers.{bid}.mlp.shared_expert.down_proj",
        Role.FFN_GATE_INP_SHEXP: "layers.{bid}.mlp.shared_expert_gate",
    },
)

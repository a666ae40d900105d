"""Mixture-of-Experts families on the LLaMA block: Mixtral, Qwen2-MoE (with a gated shared expert), Qwen3-MoE,
GLM-4.5/4.6 (`glm4_moe`) and MiniMax-M2 (`minimax_m2`).

The attention half is LLaMA's (Qwen3-MoE and GLM-4.5 add per-head q/k norms, MiniMax-M2 norms over all heads at
once; GLM-4.5 and MiniMax-M2 rotate part of each head); the MLP of each MoE block is a router over `n_experts` gated
MLPs, one tensor per expert in the checkpoint (names carry `{xid}`). Mixtral and Qwen score the experts by a softmax;
GLM-4.5 and MiniMax-M2 by sigmoids, choosing with a per-expert bias added (`e_score_correction_bias`); GLM-4.5 adds
an ungated shared expert and keeps its first blocks dense.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune.arch import llama
from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError, UnsupportedModelError
from streamprune import fused


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


def parse_glm4_moe(raw: dict[str, Any]) -> ModelConfig:
    """GLM-4.5/4.6/Air: LLaMA's fields (partial rotary from rope_parameters, 0.5 where unset), optional per-head q/k
    norms, q/k/v biases, a sigmoid router with a selection bias, groups and a scaling factor, `n_shared_experts` of
    width `moe_intermediate_size` as one ungated shared expert, the first `first_k_dense_replace` blocks dense."""
    raw = {**raw, "partial_rotary_factor": raw.get("partial_rotary_factor", 0.5)}
    base = llama.parse_config(raw)
    width = get_int(raw, "moe_intermediate_size")
    attention_bias = get_bool(raw, "attention_bias", False)
    return dataclasses.replace(
        base, family="glm4_moe", qkv_bias=attention_bias, out_bias=False, qk_norm=get_bool(raw, "use_qk_norm", False),
        n_experts=get_int(raw, "n_routed_experts"), experts_per_tok=get_int(raw, "num_experts_per_tok"),
        expert_ffn_dim=width, shared_ffn_dim=width * get_int(raw, "n_shared_experts", default=1), shared_gate=False,
        norm_topk_prob=get_bool(raw, "norm_topk_prob", True), router="sigmoid", router_bias=True,
        n_group=get_int(raw, "n_group", default=1), topk_group=get_int(raw, "topk_group", default=1),
        routed_scaling=get_float(raw, "routed_scaling_factor", 1.0),
        dense_layers=frozenset(range(min(get_int(raw, "first_k_dense_replace", default=1), base.n_layers))))


def parse_hy_v3(raw: dict[str, Any]) -> ModelConfig:
    """Hunyuan 3: LLaMA's fields with per-head q/k norms; MiniMax-M2's router (sigmoid scores, chosen with a selection
    bias, renormalized) times `router_scaling_factor`; an ungated shared expert `num_shared_experts` x
    `moe_intermediate_size` wide; the blocks `mlp_layer_types` calls dense (else the first) keep a dense MLP."""
    base = llama.parse_config(raw)
    width, n = get_int(raw, "moe_intermediate_size"), base.n_layers
    kinds = raw.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    if not isinstance(kinds, list) or len(kinds) != n or not set(kinds) <= {"dense", "sparse"}:
        raise CheckpointError(f"config.json: mlp_layer_types={kinds!r:.80} is not a list of {n} 'dense' or 'sparse'")
    return dataclasses.replace(
        base, family="hy_v3", qk_norm=True, n_experts=get_int(raw, "num_experts", "num_local_experts"),
        experts_per_tok=get_int(raw, "num_experts_per_tok"), expert_ffn_dim=width,
        shared_ffn_dim=width * get_int(raw, "num_shared_experts", default=1), shared_gate=False, norm_topk_prob=True,
        router="sigmoid", router_bias=True, routed_scaling=get_float(raw, "router_scaling_factor", 1.0),
        dense_layers=frozenset(b for b, kind in enumerate(kinds) if kind == "dense"))


def parse_ernie4_5_moe(raw: dict[str, Any]) -> ModelConfig:
    """ERNIE 4.5 MoE: LLaMA's fields, RoPE over interleaved pairs; a float32 softmax router choosing with a selection
    bias stored (1, n_experts) (`moe_statics`), the chosen weights renormalized; ungated shared experts; the MoE blocks
    every `moe_layer_interval` from `moe_layer_start_index` to `moe_layer_end_index`. `use_bias` (biases on every
    linear and the head; the released models have none) is refused."""
    if get_bool(raw, "use_bias", False):
        raise UnsupportedModelError("config.json: use_bias=True (a bias on every linear and on lm_head) is not "
                                    "supported for ernie4_5_moe; the released models have none")
    base = llama.parse_config(raw)
    n, width = base.n_layers, get_int(raw, "moe_intermediate_size")
    step, first = get_int(raw, "moe_layer_interval", default=1), get_int(raw, "moe_layer_start_index", default=0)
    last = get_int(raw, "moe_layer_end_index", default=-1)
    last = n - 1 if last == -1 else last
    if step < 1:
        raise CheckpointError(f"config.json: moe_layer_interval={step!r} is not positive")
    return dataclasses.replace(
        base, family="ernie4_5_moe", rope_interleave=True,
        n_experts=get_int(raw, "moe_num_experts", "num_experts"), experts_per_tok=get_int(raw, "moe_k", "num_experts_per_tok"),
        expert_ffn_dim=width, shared_ffn_dim=width * get_int(raw, "moe_num_shared_experts", default=0), shared_gate=False,
        norm_topk_prob=True, router_bias=True, router_bias_2d=True,
        dense_layers=frozenset(b for b in range(n) if not ((b + 1) % step == 0 and first <= b <= last)))


def parse_minimax_m2(raw: dict[str, Any]) -> ModelConfig:
    """MiniMax-M2: LLaMA's fields, q/k RMSNorm over all heads' features, `rotary_dim` rotated features per head (the
    released configs' name; `partial_rotary_factor` otherwise), and a sigmoid router with a selection bias whose
    chosen weights are renormalized; every block routed (experts of width `intermediate_size`)."""
    head_dim = get_int(raw, "head_dim", default=0) or get_int(raw, "hidden_size") // get_int(raw, "num_attention_heads")
    if raw.get("rotary_dim") is not None:
        raw = {**raw, "partial_rotary_factor": get_int(raw, "rotary_dim") / head_dim}
    base = llama.parse_config(raw)
    if get_bool(raw, "use_qk_norm", True) is False or raw.get("qk_norm_type", "per_layer") != "per_layer":
        raise UnsupportedModelError(f"config.json: use_qk_norm={raw.get('use_qk_norm')!r} / qk_norm_type="
                                    f"{raw.get('qk_norm_type')!r}: streamprune reads MiniMax-M2's q/k norms over every "
                                    "head at once (per_layer)")
    return dataclasses.replace(
        base, family="minimax_m2", qkv_bias=False, out_bias=False, qk_norm=True, qk_norm_per_head=False,
        n_experts=get_int(raw, "num_local_experts"), experts_per_tok=get_int(raw, "num_experts_per_tok"),
        expert_ffn_dim=base.ffn_dim, norm_topk_prob=True, router="sigmoid", router_bias=True)


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
    fused=fused.QWEN,
)

# DeepSeek-V3's MoE names, which GLM-4.5 takes too: the router with its selection bias, the routed experts and the
# (ungated) shared experts under `mlp.`
SIGMOID_MOE = {
    Role.FFN_GATE_INP: "layers.{bid}.mlp.gate",
    Role.FFN_EXP_PROBS_B: "layers.{bid}.mlp.gate",
    Role.FFN_GATE_EXP: "layers.{bid}.mlp.experts.{xid}.gate_proj",
    Role.FFN_UP_EXP: "layers.{bid}.mlp.experts.{xid}.up_proj",
    Role.FFN_DOWN_EXP: "layers.{bid}.mlp.experts.{xid}.down_proj",
    Role.FFN_GATE_SHEXP: "layers.{bid}.mlp.shared_experts.gate_proj",
    Role.FFN_UP_SHEXP: "layers.{bid}.mlp.shared_experts.up_proj",
    Role.FFN_DOWN_SHEXP: "layers.{bid}.mlp.shared_experts.down_proj",
}

GLM4_MOE = ArchSpec(
    name="glm4_moe",
    model_types=("glm4_moe",),
    base_prefix="model.",
    parse_config=parse_glm4_moe,
    tensors={**{role: name for role, name in llama.SPEC.tensors.items() if role is not Role.ROPE_FREQS}, **SIGMOID_MOE},
)

HY_V3 = ArchSpec(
    name="hy_v3",
    model_types=("hy_v3",),
    base_prefix="model.",
    parse_config=parse_hy_v3,
    tensors={
        **{role: name for role, name in llama.SPEC.tensors.items() if role is not Role.ROPE_FREQS},
        Role.FFN_GATE_INP: "layers.{bid}.mlp.router.gate",
        Role.FFN_EXP_PROBS_B: "layers.{bid}.mlp",  # its `expert_bias`
        Role.FFN_GATE_EXP: "layers.{bid}.mlp.experts.{xid}.gate_proj",
        Role.FFN_UP_EXP: "layers.{bid}.mlp.experts.{xid}.up_proj",
        Role.FFN_DOWN_EXP: "layers.{bid}.mlp.experts.{xid}.down_proj",
        Role.FFN_GATE_SHEXP: "layers.{bid}.mlp.shared_mlp.gate_proj",
        Role.FFN_UP_SHEXP: "layers.{bid}.mlp.shared_mlp.up_proj",
        Role.FFN_DOWN_SHEXP: "layers.{bid}.mlp.shared_mlp.down_proj",
    },
    kinds={(Role.FFN_EXP_PROBS_B, "e_score_correction_bias"): "expert_bias"},
)

ERNIE4_5_MOE = ArchSpec(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    base_prefix="model.",
    parse_config=parse_ernie4_5_moe,
    tensors={
        **{role: name for role, name in llama.SPEC.tensors.items() if role is not Role.ROPE_FREQS},
        **SIGMOID_MOE,  # the names DeepSeek-V3 gives its router, experts and shared experts
        Role.FFN_EXP_PROBS_B: "layers.{bid}.mlp.moe_statics",
    },
)

MINIMAX_M2 = ArchSpec(
    name="minimax_m2",
    model_types=("minimax_m2",),
    base_prefix="model.",
    parse_config=parse_minimax_m2,
    tensors={
        **ATTENTION,  # with its q/k norms, each over all heads' features
        Role.FFN_GATE_INP: "layers.{bid}.block_sparse_moe.gate",
        Role.FFN_EXP_PROBS_B: "layers.{bid}.block_sparse_moe",
        Role.FFN_GATE_EXP: "layers.{bid}.block_sparse_moe.experts.{xid}.w1",
        Role.FFN_DOWN_EXP: "layers.{bid}.block_sparse_moe.experts.{xid}.w2",
        Role.FFN_UP_EXP: "layers.{bid}.block_sparse_moe.experts.{xid}.w3",
    },
)

"""DeepSeek-V3, V3.1 and R1 (`deepseek_v3`), Kimi-K2 (`kimi_k2`) and GLM-4.7-Flash (`glm4_moe_lite`): one architecture;
and Kimi-K2.5/K2.6 (`kimi_k25`), the Kimi-K2 language model inside an image-text model whose vision tower is copied.

The LLaMA block with multi-head latent attention (queries through a low-rank bottleneck with its own RMSNorm; keys and
values from one compressed latent plus a rotated key shared by the heads; interleaved RoPE on `qk_rope_head_dim`
features, YaRN whose mscale also scales the softmax), and an MoE MLP: a sigmoid router choosing by score plus
`e_score_correction_bias` among the experts of the best `topk_group` of `n_group` groups, the chosen weights
renormalized and scaled by `routed_scaling_factor`, plus an ungated shared expert; the first `first_k_dense_replace`
blocks keep a dense MLP (GLM-4.7-Flash: those `mlp_layer_types` calls dense).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune.arch import llama
from streamprune.arch.moe import SIGMOID_MOE
from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int
from streamprune.errors import CheckpointError
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import UnsupportedModelError


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    if raw.get("scoring_func", "sigmoid") != "sigmoid" or raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UnsupportedModelError(f"config.json: scoring_func={raw.get('scoring_func')!r} / topk_method="
                                    f"{raw.get('topk_method')!r}: streamprune reads DeepSeek-V3's sigmoid router "
                                    "(noaux_tc)")
    nope, rope = get_int(raw, "qk_nope_head_dim"), get_int(raw, "qk_rope_head_dim")
    rope_params = llama.rope_parameters(raw)
    scale = 1.0
    if rope_params["rope_type"] != "default" and rope_params.get("mscale_all_dim"):
        scale = llama.yarn_mscale(rope_params["factor"], rope_params["mscale_all_dim"]) ** 2
    n_layers = get_int(raw, "num_hidden_layers")
    width = get_int(raw, "moe_intermediate_size")
    return ModelConfig(
        family="deepseek_v3",
        model_type=raw.get("model_type", "deepseek_v3"),
        vocab_size=get_int(raw, "vocab_size"),
        hidden_size=get_int(raw, "hidden_size"),
        n_layers=n_layers,
        n_heads=get_int(raw, "num_attention_heads"),
        head_dim=nope + rope,
        ffn_dim=get_int(raw, "intermediate_size"),
        norm_eps=get_float(raw, "rms_norm_eps", 1e-6),
        act=raw.get("hidden_act", "silu"),
        rope=rope_params,
        rotary_dim=rope,
        rope_interleave=get_bool(raw, "rope_interleave", True),
        attn_scale_factor=scale,
        q_lora_rank=get_int(raw, "q_lora_rank", default=0),
        kv_lora_rank=get_int(raw, "kv_lora_rank"),
        qk_nope_dim=nope,
        qk_rope_dim=rope,
        v_head_dim=get_int(raw, "v_head_dim"),
        qkv_bias=get_bool(raw, "attention_bias", False),
        out_bias=get_bool(raw, "attention_bias", False),
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", False),
        max_positions=get_int(raw, "max_position_embeddings", default=4096),
        n_experts=get_int(raw, "n_routed_experts"),
        experts_per_tok=get_int(raw, "num_experts_per_tok"),
        expert_ffn_dim=width,
        shared_ffn_dim=width * get_int(raw, "n_shared_experts", default=1),
        shared_gate=False,
        norm_topk_prob=get_bool(raw, "norm_topk_prob", True),
        router="sigmoid",
        router_bias=True,
        n_group=get_int(raw, "n_group", default=1),
        topk_group=get_int(raw, "topk_group", default=1),
        routed_scaling=get_float(raw, "routed_scaling_factor", 1.0),
        dense_layers=dense_layers(raw, n_layers),
        raw=raw,
    )


def parse_sparse_attention(raw: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V3.2 (`deepseek_v32`) and GLM-5 (`glm_moe_dsa`): DeepSeek-V3's blocks (interleaved RoPE in the
    attention) with DeepSeek sparse attention: each block's lightning indexer picks the `index_topk` keys each query
    attends to (its RoPE interleaved in GLM-5's, in halves in V3.2's). Every block runs its own indexer: a config
    whose `indexer_types` has blocks reuse an earlier block's choice ("shared") is refused."""
    kinds = raw.get("indexer_types")
    if kinds is not None and (not isinstance(kinds, list) or set(kinds) - {"full"}):
        raise UnsupportedModelError(f"config.json: indexer_types={kinds!r:.80}: blocks that reuse another block's "
                                    "top-k keys (\"shared\") are not supported; every block must run its own indexer")
    layer_types = raw.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or set(layer_types) - {"indexed_attention"}):
        raise UnsupportedModelError(f"config.json: layer_types={layer_types!r:.80}: only indexed_attention is read")
    base = parse_config({**raw, "rope_interleave": True, "layer_types": None})
    glm = raw["model_type"] == "glm_moe_dsa"
    cfg = dataclasses.replace(
        base, family="deepseek_v32", index_topk=get_int(raw, "index_topk", default=2048),
        index_heads=get_int(raw, "index_n_heads", default=64 if not glm else 32),
        index_head_dim=get_int(raw, "index_head_dim", default=128), index_rope_interleave=glm)
    if not cfg.q_lora_rank or not cfg.qk_rope_dim <= cfg.index_head_dim or min(cfg.index_topk, cfg.index_heads) < 1:
        raise CheckpointError(f"config.json: sparse attention with q_lora_rank={cfg.q_lora_rank}, index_topk="
                              f"{cfg.index_topk}, index_n_heads={cfg.index_heads}, index_head_dim={cfg.index_head_dim}: "
                              f"expected a query latent, positive counts, and at least qk_rope_head_dim="
                              f"{cfg.qk_rope_dim} features per indexer head")
    return cfg


def dense_layers(raw: dict[str, Any], n_layers: int) -> frozenset[int]:
    """The blocks with a dense MLP: those `mlp_layer_types` calls dense, else the first `first_k_dense_replace`."""
    kinds = raw.get("mlp_layer_types")
    if kinds is None:
        return frozenset(range(min(get_int(raw, "first_k_dense_replace", default=0), n_layers)))
    if not isinstance(kinds, list) or len(kinds) != n_layers or not set(kinds) <= {"dense", "sparse"}:
        raise CheckpointError(f"config.json: mlp_layer_types={kinds!r:.80} is not a list of {n_layers} 'dense' or "
                              "'sparse'")
    return frozenset(b for b, kind in enumerate(kinds) if kind == "dense")


def parse_image_text(raw: dict[str, Any]) -> ModelConfig:
    """Kimi-K2.5's language model: its `text_config` (Kimi-K2's), the head tied as the whole model says."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"config.json: text_config={text!r:.80} is not an object")
    return parse_config({**text, "model_type": raw["model_type"],
                         "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))})


TENSORS = {
    **{role: name for role, name in llama.SPEC.tensors.items()  # embeddings, norms, dense MLP, q_proj, o_proj
       if role not in (Role.ATTN_K, Role.ATTN_V, Role.ATTN_Q_NORM, Role.ATTN_K_NORM, Role.ROPE_FREQS)},
    **SIGMOID_MOE,
    Role.ATTN_Q_A: "layers.{bid}.self_attn.q_a_proj",
    Role.ATTN_Q_A_NORM: "layers.{bid}.self_attn.q_a_layernorm",
    Role.ATTN_Q_B: "layers.{bid}.self_attn.q_b_proj",
    Role.ATTN_KV_A_MQA: "layers.{bid}.self_attn.kv_a_proj_with_mqa",
    Role.ATTN_KV_A_NORM: "layers.{bid}.self_attn.kv_a_layernorm",
    Role.ATTN_KV_B: "layers.{bid}.self_attn.kv_b_proj",
}

SPEC = ArchSpec(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2", "glm4_moe_lite"),
    base_prefix="model.",
    parse_config=parse_config,
    tensors=TENSORS,
)

SPARSE_ATTENTION = ArchSpec(
    name="deepseek_v32",
    model_types=("deepseek_v32", "glm_moe_dsa"),
    base_prefix="model.",
    parse_config=parse_sparse_attention,
    tensors={**TENSORS,
             Role.ATTN_IDX_Q_B: "layers.{bid}.self_attn.indexer.wq_b",
             Role.ATTN_IDX_K: "layers.{bid}.self_attn.indexer.wk",
             Role.ATTN_IDX_K_NORM: "layers.{bid}.self_attn.indexer.k_norm",
             Role.ATTN_IDX_WEIGHTS: "layers.{bid}.self_attn.indexer.weights_proj"},
)

# Kimi_K25ForConditionalGeneration: the language model under `language_model.model.` (as released) or
# `model.language_model.` (transformers' module names); the vision tower and the projector pass through.
IMAGE_TEXT_SPEC = ArchSpec(
    name="kimi_k25",
    model_types=("kimi_k25",),
    base_prefix="language_model.model.",
    parse_config=parse_image_text,
    tensors=TENSORS,
    layouts=(("language_model.model.", "language_model."), ("model.language_model.", "")),
    passthrough=("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector."),
    text_config="text_config",
)

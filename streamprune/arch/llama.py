"""The LLaMA family: Llama 1-3, Mistral, Qwen2, Qwen3 (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""

from __future__ import annotations

import math
from typing import Any

from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int, get_layer_types
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError, UnsupportedModelError

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "longrope", "yarn", "proportional")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 x mscale x ln(factor) + 1 (1 for factors up to 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config style: `rope_parameters`, or `rope_theta` plus `rope_scaling`.

    LongRoPE's derived values are filled in as transformers derives them: the original context from the top level
    when the parameters lack it, `factor` as the context's growth, and the attention factor (the scale of cos and
    sin) from the factor."""
    params = raw.get("rope_parameters") or {}
    if not params:
        params = raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise UnsupportedModelError(f"config.json: rope_scaling={params!r} is not an object")
        params = {**params, "rope_theta": raw.get("rope_theta", 10000.0)}
    if not isinstance(params, dict):
        raise UnsupportedModelError(f"config.json: rope_parameters={params!r} is not an object")
    params = dict(params)
    for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if key in params:
            get_float(params, key, 0.0)  # refuses strings, booleans and non-finite values
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", 10000.0)
    if rope_type == "longrope":
        original = get_int({**raw, **params}, "original_max_position_embeddings")
        if original < 2:
            raise CheckpointError(f"config.json: original_max_position_embeddings={original!r} is not an integer of "
                                  "at least 2")
        params["original_max_position_embeddings"] = original
        factor = params.get("factor") or get_int(raw, "max_position_embeddings") / original
        default = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        params["attention_factor"] = get_float(params, "attention_factor", default)
    if rope_type == "yarn":  # as transformers derives them: the factor from the context's growth where unset, and
        original = get_int({**raw, **params}, "original_max_position_embeddings")  # the scale of cos and sin
        params["original_max_position_embeddings"] = original
        factor = params.get("factor") or get_int(raw, "max_position_embeddings") / original
        params["factor"] = float(factor)
        if params.get("attention_factor") is None:
            mscale, all_dims = params.get("mscale"), params.get("mscale_all_dim")
            params["attention_factor"] = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dims)
                                          if mscale and all_dims else yarn_mscale(factor))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise CheckpointError(f"config.json: partial_rotary_factor={partial!r} is not a fraction in (0, 1]")
    params["partial_rotary_factor"] = float(partial)
    return params


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw.get("model_type", "llama")
    n_layers = get_int(raw, "num_hidden_layers")
    sliding = raw.get("sliding_window")  # Mistral: every block slides
    layer_types = None
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):  # the blocks from max_window_layers on slide,
        if not get_bool(raw, "use_sliding_window", False):          # if use_sliding_window
            sliding = None
        first = get_int(raw, "max_window_layers", default=28)
        layer_types = get_layer_types(raw, n_layers, lambda i: sliding is not None and i >= first)
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=get_int(raw, "vocab_size"),
        hidden_size=get_int(raw, "hidden_size"),
        n_layers=n_layers,
        n_heads=get_int(raw, "num_attention_heads"),
        n_kv_heads=get_int(raw, "num_key_value_heads", default=0),
        head_dim=get_int(raw, "head_dim", default=0),
        ffn_dim=get_int(raw, "intermediate_size"),
        norm="rms",
        norm_eps=get_float(raw, "rms_norm_eps", 1e-6),
        act=raw.get("hidden_act", "silu"),
        gated=True,
        pos="rope",
        rope=rope_parameters(raw),
        qkv_bias=(model_type == "qwen2" or get_bool(raw, "attention_bias", False)
                  or (model_type == "qwen2_moe" and get_bool(raw, "qkv_bias", True))),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        out_bias=get_bool(raw, "attention_bias", False),
        mlp_bias=get_bool(raw, "mlp_bias", False),
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", False),
        max_positions=get_int(raw, "max_position_embeddings", default=2048),
        sliding_window=sliding,
        layer_types=layer_types or (),
        raw=raw,
    )


SPEC = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    base_prefix="model.",
    parse_config=parse_config,
    tensors={
        Role.TOKEN_EMBD: "embed_tokens",
        Role.OUTPUT_NORM: "norm",
        Role.OUTPUT: "lm_head",
        Role.ATTN_NORM: "layers.{bid}.input_layernorm",
        Role.ATTN_Q: "layers.{bid}.self_attn.q_proj",
        Role.ATTN_K: "layers.{bid}.self_attn.k_proj",
        Role.ATTN_V: "layers.{bid}.self_attn.v_proj",
        Role.ATTN_Q_NORM: "layers.{bid}.self_attn.q_norm",
        Role.ATTN_K_NORM: "layers.{bid}.self_attn.k_norm",
        Role.ATTN_OUT: "layers.{bid}.self_attn.o_proj",
        Role.FFN_NORM: "layers.{bid}.post_attention_layernorm",
        Role.FFN_GATE: "layers.{bid}.mlp.gate_proj",
        Role.FFN_UP: "layers.{bid}.mlp.up_proj",
        Role.FFN_DOWN: "layers.{bid}.mlp.down_proj",
        Role.ROPE_FREQS: "layers.{bid}.self_attn.rotary_emb",
    },
)

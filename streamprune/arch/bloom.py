"""BLOOM: ALiBi, fused query_key_value, LayerNorm after the embedding, tanh-GELU MLP."""

from __future__ import annotations

from typing import Any

from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    hidden = get_int(raw, "hidden_size", "n_embed")
    return ModelConfig(
        family="bloom",
        model_type="bloom",
        vocab_size=get_int(raw, "vocab_size"),
        hidden_size=hidden,
        n_layers=get_int(raw, "n_layer", "num_hidden_layers"),
        n_heads=get_int(raw, "n_head", "num_attention_heads"),
        ffn_dim=4 * hidden,
        norm="layer",
        norm_eps=get_float(raw, "layer_norm_epsilon", 1e-5),
        act="gelu_tanh",
        gated=False,
        pos="alibi",
        qkv_layout="per_head",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        residual_from_norm=get_bool(raw, "apply_residual_connection_post_layernorm", False),
        embed_norm=True,
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", True),
        max_positions=raw.get("seq_length") or None,
        raw=raw,
    )


SPEC = ArchSpec(
    name="bloom",
    model_types=("bloom",),
    base_prefix="transformer.",
    parse_config=parse_config,
    tensors={
        Role.TOKEN_EMBD: "word_embeddings",
        Role.EMBD_NORM: "word_embeddings_layernorm",
        Role.OUTPUT_NORM: "ln_f",
        Role.OUTPUT: "lm_head",
        Role.ATTN_NORM: "h.{bid}.input_layernorm",
        Role.ATTN_QKV: "h.{bid}.self_attention.query_key_value",
        Role.ATTN_OUT: "h.{bid}.self_attention.dense",
        Role.FFN_NORM: "h.{bid}.post_attention_layernorm",
        Role.FFN_UP: "h.{bid}.mlp.dense_h_to_4h",
        Role.FFN_DOWN: "h.{bid}.mlp.dense_4h_to_h",
    },
)

"""OPT: LayerNorm, learned positions offset by 2, ReLU MLP, optional project_in/project_out."""

from __future__ import annotations

from typing import Any

from streamprune.arch.config import ModelConfig, get_bool, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec

OPT_POSITION_OFFSET = 2


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    before = get_bool(raw, "do_layer_norm_before", True)
    bias = get_bool(raw, "enable_bias", True)
    hidden = get_int(raw, "hidden_size")
    return ModelConfig(
        family="opt",
        model_type="opt",
        vocab_size=get_int(raw, "vocab_size"),
        hidden_size=hidden,
        n_layers=get_int(raw, "num_hidden_layers"),
        n_heads=get_int(raw, "num_attention_heads"),
        ffn_dim=get_int(raw, "ffn_dim"),
        norm="layer",
        norm_eps=1e-5,
        norm_affine=get_bool(raw, "layer_norm_elementwise_affine", True),
        act=raw.get("activation_function", "relu"),
        gated=False,
        pos="learned",
        pos_offset=OPT_POSITION_OFFSET,
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        norm_before=before,
        final_norm=before and not raw.get("_remove_final_layer_norm", False),
        embed_dim=get_int(raw, "word_embed_proj_dim", default=hidden),
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", True),
        max_positions=get_int(raw, "max_position_embeddings", default=2048),
        raw=raw,
    )


SPEC = ArchSpec(
    name="opt",
    model_types=("opt",),
    base_prefix="model.",
    parse_config=parse_config,
    tensors={
        Role.TOKEN_EMBD: "decoder.embed_tokens",
        Role.POS_EMBD: "decoder.embed_positions",
        Role.PROJ_IN: "decoder.project_in",
        Role.PROJ_OUT: "decoder.project_out",
        Role.OUTPUT_NORM: "decoder.final_layer_norm",
        Role.OUTPUT: "lm_head",
        Role.ATTN_NORM: "decoder.layers.{bid}.self_attn_layer_norm",
        Role.ATTN_Q: "decoder.layers.{bid}.self_attn.q_proj",
        Role.ATTN_K: "decoder.layers.{bid}.self_attn.k_proj",
        Role.ATTN_V: "decoder.layers.{bid}.self_attn.v_proj",
        Role.ATTN_OUT: "decoder.layers.{bid}.self_attn.out_proj",
        Role.FFN_NORM: "decoder.layers.{bid}.final_layer_norm",
        Role.FFN_UP: "decoder.layers.{bid}.fc1",
        Role.FFN_DOWN: "decoder.layers.{bid}.fc2",
    },
)

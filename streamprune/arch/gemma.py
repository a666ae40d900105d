"""Gemma 2 and Gemma 3 (text, and the language model of a Gemma 3 image-text checkpoint).

The LLaMA block with: RMSNorm scaling by (1 + weight); norms after attention and after the MLP as well as
before them; the embedding multiplied by sqrt(hidden_size); attention scaled by 1/sqrt(query_pre_attn_scalar);
GeGLU with tanh GELU; blocks alternating between sliding-window and global attention (`layer_types`, or the
older `sliding_window_pattern`). Gemma 2 soft-caps attention and output logits; Gemma 3 normalizes each head's
queries and keys and rotates sliding blocks with their own RoPE base (`rope_local_base_freq`).
"""

from __future__ import annotations

from typing import Any

from streamprune.arch import llama
from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int, get_layer_types
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError, UnsupportedModelError

ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}
# transformers' defaults for what a config.json may leave out
DEFAULTS = {"gemma2": dict(pattern=2, attn_softcap=50.0, final_softcap=30.0, max_positions=8192),
            "gemma3": dict(pattern=6, attn_softcap=None, final_softcap=None, max_positions=131072)}
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # Gemma 3's RoPE bases


def optional_float(raw: dict[str, Any], key: str, default: float | None) -> float | None:
    if key not in raw:
        return default
    return None if raw[key] is None else get_float(raw, key, 0.0)


def gemma3_rope(text: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """RoPE of the global and of the sliding blocks: from `rope_parameters` by layer type, or from the older
    `rope_theta` and `rope_scaling` (global) with `rope_local_base_freq` (sliding)."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        by_type = []
        for kind, theta in (("full_attention", GLOBAL_THETA), ("sliding_attention", LOCAL_THETA)):
            sub = params.get(kind) or {}
            if not isinstance(sub, dict):
                raise CheckpointError(f"config.json: rope_parameters[{kind!r}]={sub!r} is not an object")
            by_type.append(llama.rope_parameters({**text, "rope_parameters": {"rope_theta": theta, **sub}}))
        return by_type[0], by_type[1]
    full = llama.rope_parameters({**text, "rope_theta": text.get("rope_theta", GLOBAL_THETA)})
    local = get_float(text, "rope_local_base_freq", LOCAL_THETA)
    return full, llama.rope_parameters({"rope_parameters": {"rope_type": "default", "rope_theta": local}})


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    model_type = raw["model_type"]
    text = raw
    if model_type == "gemma3":  # the image-text model: its language model's config
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(f"config.json: text_config={text!r:.80} is not an object")
    gemma2 = model_type == "gemma2"
    defaults = DEFAULTS["gemma2" if gemma2 else "gemma3"]
    if get_bool(text, "use_bidirectional_attention", False):
        raise UnsupportedModelError("config.json: use_bidirectional_attention=True (an embedding model) is not "
                                    "supported; streamprune prunes causal language models")
    n_layers = get_int(text, "num_hidden_layers")
    pattern = get_int(text, "sliding_window_pattern", "_sliding_window_pattern", default=defaults["pattern"])
    if pattern < 1:
        raise CheckpointError(f"config.json: sliding_window_pattern={pattern!r} is not positive")
    rope, rope_sliding = (llama.rope_parameters(text), None) if gemma2 else gemma3_rope(text)
    act = text.get("hidden_activation", text.get("hidden_act", "gelu_pytorch_tanh"))
    return ModelConfig(
        family="gemma",
        model_type=model_type,
        vocab_size=get_int(text, "vocab_size"),
        hidden_size=get_int(text, "hidden_size"),
        n_layers=n_layers,
        n_heads=get_int(text, "num_attention_heads"),
        n_kv_heads=get_int(text, "num_key_value_heads", default=0),
        head_dim=get_int(text, "head_dim", default=256),
        ffn_dim=get_int(text, "intermediate_size"),
        norm="rms",
        norm_eps=get_float(text, "rms_norm_eps", 1e-6),
        norm_offset=1.0,
        post_norms=True,
        act=ACTIVATIONS.get(act, act),
        gated=True,
        pos="rope",
        rope=rope,
        rope_sliding=rope_sliding,
        qkv_bias=get_bool(text, "attention_bias", False),
        out_bias=get_bool(text, "attention_bias", False),
        qk_norm=not gemma2,
        embed_scale=get_int(text, "hidden_size") ** 0.5,
        query_pre_attn_scalar=get_float(text, "query_pre_attn_scalar", 256.0),
        # Gemma 3's attention takes no soft-capping in transformers, whatever its config says
        attn_softcap=optional_float(text, "attn_logit_softcapping", defaults["attn_softcap"]) if gemma2 else None,
        final_softcap=optional_float(text, "final_logit_softcapping", defaults["final_softcap"]),
        tie_word_embeddings=get_bool(raw, "tie_word_embeddings", True),
        max_positions=get_int(text, "max_position_embeddings", default=defaults["max_positions"]),
        sliding_window=text.get("sliding_window", 4096),  # null: the sliding blocks attend to everything
        layer_types=get_layer_types(text, n_layers, lambda i: (i + 1) % pattern != 0),
        raw=raw,
    )


TENSORS = {  # LLaMA's names, with a norm after attention and after the MLP (and the MLP's own before it)
    **{role: name for role, name in llama.SPEC.tensors.items() if role is not Role.ROPE_FREQS},
    Role.ATTN_POST_NORM: "layers.{bid}.post_attention_layernorm",
    Role.FFN_NORM: "layers.{bid}.pre_feedforward_layernorm",
    Role.FFN_POST_NORM: "layers.{bid}.post_feedforward_layernorm",
}

SPEC = ArchSpec(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    base_prefix="model.",
    parse_config=parse_config,
    tensors=TENSORS,
)

# Gemma3ForConditionalGeneration: the language model under `language_model.model.` (as transformers saves it, and
# as released) or `model.language_model.` (its module names); the vision tower and the projector pass through.
IMAGE_TEXT_SPEC = ArchSpec(
    name="gemma3",
    model_types=("gemma3",),
    base_prefix="language_model.model.",
    parse_config=parse_config,
    tensors=TENSORS,
    layouts=(("language_model.model.", "language_model."), ("model.language_model.", "")),
    passthrough=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
)

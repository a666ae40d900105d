"""Gemma 4 (`gemma4_text`; `gemma4`, the image-text model as released, its vision and audio towers copied).

Gemma 3's block (norms before and after attention and the MLP, the embedding times sqrt(hidden_size), GeGLU, sliding
blocks beside global ones) with: RMSNorms that scale by their weight (not 1 + weight); per-head RMSNorms of queries and
keys, and of values without weights; attention unscaled (the norms set it); global blocks with their own head width
(`global_head_dim`) and key-value heads (`num_global_key_value_heads`, where `attention_k_eq_v`), whose values are
their keys' projection where `attention_k_eq_v` (no v_proj), rotated by proportional RoPE (every feature pair of the
head, the first `partial_rotary_factor` of the frequencies, the rest at zero); each block's output multiplied by its
stored `layer_scalar`. The edge models (E2B, E4B) add per-layer inputs (`hidden_size_per_layer_input`; perlayer.py):
after its MLP, each block gates its own inputs by its output (GELU of `per_layer_input_gate`), projects them back
(`per_layer_projection`, normalized) and adds them to the residual stream; and their last `num_kv_shared_layers`
blocks reuse the keys and values of the last earlier block of their layer type (no k/v projections of their own; their
MLP twice as wide where `use_double_wide_mlp`). The MoE block (`enable_moe_block`, 26B-A4B) is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune.arch import gemma
from streamprune.arch.config import ModelConfig, get_bool, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError, UnsupportedModelError

# transformers' RoPE of each layer type where config.json names none
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's section of config.json (the image-text model's `text_config`)."""
    if raw["model_type"] != "gemma4":
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"config.json: text_config={text!r:.80} is not an object")
    return {**text, "model_type": "gemma4_text",
            "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}


def global_geometry(text: dict[str, Any], layer_types: list[str]) -> tuple[int, int]:
    """The global blocks' head width and key-value heads: from `per_layer_config` (what transformers writes), else
    from `global_head_dim` and, where `attention_k_eq_v`, `num_global_key_value_heads`."""
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        kv = get_int(text, "num_global_key_value_heads", default=0) if get_bool(text, "attention_k_eq_v", False) else 0
        return get_int(text, "global_head_dim", default=512), kv
    if not isinstance(per_layer, dict):
        raise CheckpointError(f"config.json: per_layer_config={per_layer!r:.80} is not an object")
    seen = set()
    for i, kind in enumerate(layer_types):
        entry = per_layer.get(str(i), per_layer.get(i, {})) if kind == "full_attention" else {}
        if not isinstance(entry, dict) or set(entry) - {"head_dim", "num_key_value_heads"}:
            raise UnsupportedModelError(f"config.json: per_layer_config[{i}]={entry!r:.80} overrides other than "
                                        "head_dim and num_key_value_heads are not supported")
        if kind == "full_attention":
            seen.add((get_int(entry, "head_dim", default=0), get_int(entry, "num_key_value_heads", default=0)))
        elif entry:
            raise UnsupportedModelError(f"config.json: per_layer_config overrides sliding block {i}; only the global "
                                        "blocks may have their own heads")
    if len(seen) > 1:
        raise UnsupportedModelError(f"config.json: global blocks with different heads {sorted(seen)} are not supported")
    return seen.pop() if seen else (0, 0)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    text = text_config(raw)
    n_layers = get_int(text, "num_hidden_layers")
    if get_bool(text, "enable_moe_block", False):
        raise UnsupportedModelError("config.json: Gemma 4 with routed experts beside the MLP (enable_moe_block) is not "
                                    "supported yet")
    layer_types = text.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                              for i in range(n_layers)]
    if isinstance(layer_types, list) and layer_types:  # transformers makes the last block global, whatever it says
        layer_types = [*layer_types[:-1], "full_attention"]
    params = text.get("rope_parameters") or DEFAULT_ROPE
    fields = {**text, "rope_parameters": {kind: {**DEFAULT_ROPE[kind], **(params.get(kind) or {})}
                                          for kind in DEFAULT_ROPE} if isinstance(params, dict) else params,
              "layer_types": layer_types, "query_pre_attn_scalar": 1.0, "sliding_window_pattern": 6,
              "final_logit_softcapping": text.get("final_logit_softcapping"),
              "sliding_window": text.get("sliding_window", 512)}
    base = gemma.parse_config({**fields, "model_type": "gemma3_text"})
    head_dim, kv_heads = global_geometry(text, base.layer_types)
    return dataclasses.replace(
        base, family="gemma4", model_type=raw["model_type"], norm_offset=0.0, v_norm=True, layer_scalar=True,
        global_head_dim=head_dim if head_dim != base.head_dim else 0, global_kv_heads=kv_heads,
        global_values_from_keys=get_bool(text, "attention_k_eq_v", False),
        per_layer_dim=get_int(text, "hidden_size_per_layer_input", default=256),
        per_layer_vocab=get_int(text, "vocab_size_per_layer_input", default=262144),
        kv_shared_layers=get_int(text, "num_kv_shared_layers", default=0),
        double_wide_mlp=get_bool(text, "use_double_wide_mlp", False),
        head_dim=get_int(text, "head_dim", default=256), raw=raw)


TENSORS = {
    **{role: name for role, name in gemma.TENSORS.items()},
    Role.LAYER_SCALAR: "layers.{bid}",  # its buffer `layer_scalar`
    Role.PLE_EMBD: "embed_tokens_per_layer",
    Role.PLE_MODEL_PROJ: "per_layer_model_projection",
    Role.PLE_PROJ_NORM: "per_layer_projection_norm",
    Role.PLE_GATE: "layers.{bid}.per_layer_input_gate",
    Role.PLE_PROJ: "layers.{bid}.per_layer_projection",
    Role.PLE_POST_NORM: "layers.{bid}.post_per_layer_input_norm",
}
# a checkpoint of the language model alone may keep the image-text model's names
TEXT_LAYOUTS = (("model.", ""), ("model.language_model.", ""), ("", ""))

SPEC = ArchSpec(
    name="gemma4",
    model_types=("gemma4_text",),
    base_prefix="model.",
    parse_config=parse_config,
    tensors=TENSORS,
    layouts=TEXT_LAYOUTS,
)

# Gemma4ForConditionalGeneration: the language model under `model.language_model.` (the head tied to its embedding);
# the vision and audio towers and their embedders pass through
IMAGE_TEXT_SPEC = ArchSpec(
    name="gemma4",
    model_types=("gemma4",),
    base_prefix="model.language_model.",
    parse_config=parse_config,
    tensors=TENSORS,
    layouts=(("model.language_model.", ""),),
    passthrough=("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio."),
    text_config="text_config",
)

"""Llama 4 (`llama4_text`; `llama4`, the image-text model as released: Scout, Maverick).

LLaMA's block with three changes in attention and one in the MLP. Most blocks rotate (RoPE on interleaved pairs,
as complex numbers) and see only their own chunk of `attention_chunk_size` tokens ("chunked_attention"); their
queries and keys are then scaled to unit RMS without weights (`use_qk_norm`). Every `no_rope_layer_interval`-th
block (`no_rope_layers[i]` = 0) has no positions at all and attends to every earlier token; its queries are scaled
by a temperature that grows with the position (`attn_temperature_tuning`, `floor_scale`, `attn_scale`). The MLP of
every `interleave_moe_layer_step`-th block (`moe_layers`) routes each token to its top-1 expert by a sigmoid of the
router's logit, which multiplies the expert's *input*, beside an always-on shared expert; the other blocks have a
dense MLP `intermediate_size_mlp` wide. The experts are stored fused ([E, H, 2I], gate then up, as x @ W reads them:
`fused.LLAMA4`); a checkpoint with one tensor per expert (`feed_forward.experts.{e}.*_proj`) is read as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune import fused
from streamprune.arch import llama
from streamprune.arch.config import ModelConfig, get_bool, get_float, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError


def block_list(raw: dict[str, Any], key: str, n_layers: int) -> list[int] | None:
    value = raw.get(key)
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"config.json: {key}={value!r:.80} is not a list of integers")
    return value


def parse_text(raw: dict[str, Any]) -> ModelConfig:
    base = llama.parse_config(raw)
    n = base.n_layers
    step = get_int(raw, "interleave_moe_layer_step", default=1)
    interval = get_int(raw, "no_rope_layer_interval", default=4)
    if step < 1 or interval < 1:
        raise CheckpointError(f"config.json: interleave_moe_layer_step={step!r} / no_rope_layer_interval={interval!r} "
                              "are not positive")
    moe_layers = block_list(raw, "moe_layers", n)
    moe_layers = list(range(step - 1, n, step)) if moe_layers is None else moe_layers
    rotates = block_list(raw, "no_rope_layers", n) or [int((i + 1) % interval != 0) for i in range(n)]
    if len(rotates) != n or not set(rotates) <= {0, 1} or not set(moe_layers) <= set(range(n)):
        raise CheckpointError(f"config.json: no_rope_layers={rotates!r:.80} is not {n} flags, or moe_layers="
                              f"{moe_layers!r:.80} names a block outside 0..{n - 1}")
    chunk = raw.get("attention_chunk_size")
    layer_types = raw.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention"
                                             for r in rotates]
    width = get_int(raw, "intermediate_size")
    tuning = get_bool(raw, "attn_temperature_tuning", True)
    return dataclasses.replace(
        base, family="llama4", model_type=raw["model_type"], ffn_dim=get_int(raw, "intermediate_size_mlp"),
        rope_interleave=True, qk_unit_norm=get_bool(raw, "use_qk_norm", True), layer_types=tuple(layer_types),
        attention_chunk=chunk, nope_layers=frozenset(i for i, r in enumerate(rotates) if not r),
        nope_temperature=(get_float(raw, "floor_scale", 8192.0), get_float(raw, "attn_scale", 0.1)) if tuning else None,
        n_experts=get_int(raw, "num_local_experts"), experts_per_tok=get_int(raw, "num_experts_per_tok", default=1),
        expert_ffn_dim=width, shared_ffn_dim=width, shared_gate=False, router="topk_sigmoid",
        weight_expert_input=True, dense_layers=frozenset(range(n)) - set(moe_layers), sliding_window=None)


def parse_image_text(raw: dict[str, Any]) -> ModelConfig:
    """The image-text model's language model: its `text_config`, the head tied as the whole model says."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"config.json: text_config={text!r:.80} is not an object")
    cfg = parse_text({**text, "model_type": "llama4_text",
                      "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))})
    return dataclasses.replace(cfg, model_type=raw["model_type"], raw=raw)


TENSORS = {
    **{role: name.replace(".mlp.", ".feed_forward.") for role, name in llama.SPEC.tensors.items()
       if role not in (Role.ATTN_Q_NORM, Role.ATTN_K_NORM, Role.ROPE_FREQS)},
    Role.FFN_GATE_INP: "layers.{bid}.feed_forward.router",
    Role.FFN_GATE_EXP: "layers.{bid}.feed_forward.experts.{xid}.gate_proj",
    Role.FFN_UP_EXP: "layers.{bid}.feed_forward.experts.{xid}.up_proj",
    Role.FFN_DOWN_EXP: "layers.{bid}.feed_forward.experts.{xid}.down_proj",
    Role.FFN_GATE_SHEXP: "layers.{bid}.feed_forward.shared_expert.gate_proj",
    Role.FFN_UP_SHEXP: "layers.{bid}.feed_forward.shared_expert.up_proj",
    Role.FFN_DOWN_SHEXP: "layers.{bid}.feed_forward.shared_expert.down_proj",
}

SPEC = ArchSpec(
    name="llama4",
    model_types=("llama4_text",),
    base_prefix="model.",
    parse_config=parse_text,
    tensors=TENSORS,
    # a checkpoint of the language model alone may keep the image-text model's names
    layouts=(("model.", ""), ("language_model.model.", "language_model."), ("", "")),
    fused=fused.LLAMA4,
)

# Llama4ForConditionalGeneration: the language model under `language_model.model.`, its head `language_model.lm_head`;
# the vision tower and the projector pass through
IMAGE_TEXT_SPEC = ArchSpec(
    name="llama4",
    model_types=("llama4",),
    base_prefix="language_model.model.",
    parse_config=parse_image_text,
    tensors=TENSORS,
    layouts=(("language_model.model.", "language_model."),),
    passthrough=("vision_model.", "multi_modal_projector."),
    fused=fused.LLAMA4,
    text_config="text_config",
)

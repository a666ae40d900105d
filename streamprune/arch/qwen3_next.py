"""The hybrid Qwen families: Qwen3-Next (`qwen3_next`) and Qwen3.5/3.6 (`qwen3_5_text` dense, `qwen3_5_moe_text`;
the image-text `qwen3_5` and `qwen3_5_moe`, whose language model is pruned and whose vision tower is copied).

Three of every four blocks (`layer_types`, else every `full_attention_interval`-th block is attention) mix tokens by
Gated DeltaNet linear attention (delta.py), the others by gated attention: the query projection is twice as wide,
each head's query followed by its output gate, whose sigmoid scales the attention's output; per-head q/k RMSNorm;
a quarter of each head rotated. Every RMSNorm but the linear attention's output norm scales by (1 + weight). The MLP
is Qwen2-MoE's (softmax router, a shared expert behind a sigmoid gate) or, in Qwen3.5's dense models, LLaMA's.
Multi-token-prediction layers (`mtp.*`) are copied as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from streamprune.arch import llama, moe
from streamprune.arch.config import ModelConfig, get_bool, get_int
from streamprune.arch.roles import Role
from streamprune.arch.spec import ArchSpec
from streamprune.errors import CheckpointError
from streamprune import fused

MOE_TYPES = ("qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe")
WRAPPERS = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}  # image-text -> its language model


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: the image-text models' `text_config`, the others' own."""
    if raw["model_type"] not in WRAPPERS:
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"config.json: text_config={text!r:.80} is not an object")
    return {**text, "model_type": WRAPPERS[raw["model_type"]],
            "tie_word_embeddings": raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))}


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    text = text_config(raw)
    model_type = text["model_type"]
    n_layers = get_int(text, "num_hidden_layers")
    interval = get_int(text, "full_attention_interval", default=4)
    if interval < 1:
        raise CheckpointError(f"config.json: full_attention_interval={interval!r} is not positive")
    layer_types = text.get("layer_types") or ["linear_attention" if (i + 1) % interval else "full_attention"
                                              for i in range(n_layers)]
    # the MoE models name no dense width: their MLP blocks all route
    fields = {**text, "rope_parameters": {"partial_rotary_factor": 0.25, **(text.get("rope_parameters") or {})},
              "intermediate_size": text.get("intermediate_size") or text.get("moe_intermediate_size")}
    base = moe.parse_config(fields) if model_type in MOE_TYPES else llama.parse_config(fields)
    if model_type == "qwen3_5_moe_text":  # its router always renormalizes the chosen weights
        base = dataclasses.replace(base, norm_topk_prob=True)
    return dataclasses.replace(
        base, family="qwen3_next", model_type=raw["model_type"], norm_offset=1.0, qk_norm=True,
        qkv_bias=get_bool(text, "attention_bias", False), out_bias=get_bool(text, "attention_bias", False),
        attn_output_gate=True, layer_types=layer_types, sliding_window=None,
        linear_k_heads=get_int(text, "linear_num_key_heads"), linear_v_heads=get_int(text, "linear_num_value_heads"),
        linear_k_dim=get_int(text, "linear_key_head_dim"), linear_v_dim=get_int(text, "linear_value_head_dim"),
        linear_conv=get_int(text, "linear_conv_kernel_dim", default=4),
        linear_fused_in=model_type == "qwen3_next", raw=raw)


LINEAR_ATTENTION = {
    Role.SSM_IN_QKVZ: "layers.{bid}.linear_attn.in_proj_qkvz",
    Role.SSM_IN_BA: "layers.{bid}.linear_attn.in_proj_ba",
    Role.SSM_IN_QKV: "layers.{bid}.linear_attn.in_proj_qkv",
    Role.SSM_IN_Z: "layers.{bid}.linear_attn.in_proj_z",
    Role.SSM_IN_B: "layers.{bid}.linear_attn.in_proj_b",
    Role.SSM_IN_A: "layers.{bid}.linear_attn.in_proj_a",
    Role.SSM_CONV1D: "layers.{bid}.linear_attn.conv1d",
    Role.SSM_A: "layers.{bid}.linear_attn",  # its parameters A_log and dt_bias
    Role.SSM_NORM: "layers.{bid}.linear_attn.norm",
    Role.SSM_OUT: "layers.{bid}.linear_attn.out_proj",
}
TENSORS = {**{role: name for role, name in moe.QWEN_MOE.tensors.items() if role is not Role.ROPE_FREQS},
           **LINEAR_ATTENTION}
# a checkpoint of the language model alone may keep the image-text model's names (`model.language_model.`)
TEXT_LAYOUTS = (("model.", ""), ("model.language_model.", ""), ("", ""))

SPEC = ArchSpec(
    name="qwen3_next",
    model_types=("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"),
    base_prefix="model.",
    parse_config=parse_config,
    tensors=TENSORS,
    layouts=TEXT_LAYOUTS,
    fused=fused.QWEN,
    mtp_prefix="mtp.",
    mtp_key="mtp_num_hidden_layers",
)

IMAGE_TEXT_SPEC = ArchSpec(
    name="qwen3_5",
    model_types=tuple(WRAPPERS),
    base_prefix="model.language_model.",
    parse_config=parse_config,
    tensors=TENSORS,
    layouts=(("model.language_model.", ""),),
    passthrough=("model.visual.",),
    fused=fused.QWEN,
    mtp_prefix="mtp.",
    mtp_key="mtp_num_hidden_layers",
    text_config="text_config",
)

"""Architecture registry: dispatch on config.json's model_type / architectures."""

from __future__ import annotations

from typing import Any

from streamprune.arch import bloom, deepseek, gemma, gemma4, gpt_oss, llama, llama4, moe, opt, phi3, qwen3_next
from streamprune.arch.config import ModelConfig
from streamprune.arch.roles import EXPERT_ROLES, EXPERT_SEQUENTIAL, PRUNABLE, SEQUENTIAL, Role, Site
from streamprune.arch.spec import ArchSpec, Param, expected_params, expert_params
from streamprune.errors import UnsupportedModelError

REGISTRY: dict[str, ArchSpec] = {
    model_type: spec for spec in (llama.SPEC, opt.SPEC, bloom.SPEC, phi3.SPEC, gemma.SPEC, gemma.IMAGE_TEXT_SPEC,
                                  moe.MIXTRAL, moe.QWEN_MOE, moe.GLM4_MOE, moe.MINIMAX_M2, deepseek.SPEC,
                                  qwen3_next.SPEC, qwen3_next.IMAGE_TEXT_SPEC, gpt_oss.SPEC, moe.HY_V3,
                                  moe.ERNIE4_5_MOE, deepseek.IMAGE_TEXT_SPEC, llama4.SPEC, llama4.IMAGE_TEXT_SPEC,
                                  gemma4.SPEC, gemma4.IMAGE_TEXT_SPEC, deepseek.SPARSE_ATTENTION)
    for model_type in spec.model_types
}

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "OPTForCausalLM": "opt",
    "BloomForCausalLM": "bloom",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Glm4MoeForCausalLM": "glm4_moe",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "GptOssForCausalLM": "gpt_oss",
    "HYV3ForCausalLM": "hy_v3",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
    "Kimi_K25ForConditionalGeneration": "kimi_k25",
    "Llama4ForCausalLM": "llama4_text",
    "Llama4ForConditionalGeneration": "llama4",
    "Gemma4ForCausalLM": "gemma4_text",
    "Gemma4ForConditionalGeneration": "gemma4",
    "DeepseekV32ForCausalLM": "deepseek_v32",
    "GlmMoeDsaForCausalLM": "glm_moe_dsa",
}


def supported() -> str:
    return ", ".join(sorted(REGISTRY))


def resolve(raw: dict[str, Any]) -> tuple[ArchSpec, ModelConfig]:
    """Find the family of a parsed config.json and parse it; anything unknown is refused."""
    model_type = raw.get("model_type")
    if model_type is None:
        archs = raw.get("architectures") or []
        known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if not known:
            raise UnsupportedModelError(
                f"config.json has no model_type and architectures={archs!r} names none of the supported "
                f"ones ({', '.join(ARCHITECTURES)})"
            )
        model_type = known[0]
        raw = {**raw, "model_type": model_type}
    if model_type not in REGISTRY:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported; supported: {supported()}")
    spec = REGISTRY[model_type]
    return spec, spec.parse_config(raw)


__all__ = [
    "ArchSpec",
    "EXPERT_ROLES",
    "EXPERT_SEQUENTIAL",
    "ModelConfig",
    "PRUNABLE",
    "Param",
    "REGISTRY",
    "Role",
    "SEQUENTIAL",
    "Site",
    "expected_params",
    "expert_params",
    "resolve",
    "supported",
]

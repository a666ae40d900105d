"""An architecture is a table: tensor roles -> checkpoint names, plus a config parser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamprune.arch.config import ModelConfig
from streamprune.arch.roles import Role

Param = tuple[Role, str]  # (role, "weight" | "bias" | another parameter of the module, e.g. a router's bias)


@dataclass(frozen=True)
class ArchSpec:
    """Names of every tensor role of one family.

    `tensors` maps a role to its module path; block roles carry `{bid}`. Paths are relative to
    `base_prefix` (the prefix a *ForCausalLM checkpoint puts in front of the base model), except
    the roles in `unprefixed` (lm_head). Checkpoints saved from the base model omit the prefix;
    the reader accepts both.
    """

    name: str
    model_types: tuple[str, ...]
    tensors: dict[Role, str]
    parse_config: Callable[[dict[str, Any]], ModelConfig]
    base_prefix: str = ""
    unprefixed: frozenset[Role] = frozenset({Role.OUTPUT})
    optional: frozenset[Role] = frozenset({Role.ROPE_FREQS})
    # (base prefix, prefix of the unprefixed roles) pairs a checkpoint may use, tried in order; () is
    # ((base_prefix, ""), ("", ""))
    layouts: tuple[tuple[str, str], ...] = ()
    # name prefixes of tensors outside the language model (a vision tower): copied to the output as they are
    passthrough: tuple[str, ...] = ()


def expected_params(cfg: ModelConfig, moe: bool = False) -> dict[Param, tuple[int, ...]]:
    """Every parameter the config implies outside the routed experts, with its shape, for a block with routed
    experts (`moe`) or a dense MLP. Roles absent here must not be in the file."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.n_heads * hd, cfg.n_kv_heads * hd
    params: dict[Param, tuple[int, ...]] = {(Role.TOKEN_EMBD, "weight"): (cfg.vocab_size, cfg.embed_dim)}

    def linear(role: Role, out: int, inp: int, bias: bool) -> None:
        params[(role, "weight")] = (out, inp)
        if bias:
            params[(role, "bias")] = (out,)

    def norm(role: Role, dim: int) -> None:
        if cfg.norm_affine:
            params[(role, "weight")] = (dim,)
            if cfg.norm == "layer":
                params[(role, "bias")] = (dim,)

    if cfg.pos == "learned":
        assert cfg.max_positions is not None
        params[(Role.POS_EMBD, "weight")] = (cfg.max_positions + cfg.pos_offset, d)
    if cfg.embed_norm:
        norm(Role.EMBD_NORM, d)
    if cfg.embed_dim != d:
        linear(Role.PROJ_IN, d, cfg.embed_dim, False)
        linear(Role.PROJ_OUT, cfg.embed_dim, d, False)
    if cfg.final_norm:
        norm(Role.OUTPUT_NORM, d)
    if not cfg.tie_word_embeddings:
        params[(Role.OUTPUT, "weight")] = (cfg.vocab_size, cfg.embed_dim)
    norm(Role.ATTN_NORM, d)
    norm(Role.FFN_NORM, d)
    if cfg.kv_lora_rank:  # multi-head latent attention
        if cfg.q_lora_rank:
            linear(Role.ATTN_Q_A, cfg.q_lora_rank, d, cfg.qkv_bias)
            norm(Role.ATTN_Q_A_NORM, cfg.q_lora_rank)
            linear(Role.ATTN_Q_B, q_out, cfg.q_lora_rank, False)
        else:
            linear(Role.ATTN_Q, q_out, d, False)
        linear(Role.ATTN_KV_A_MQA, cfg.kv_lora_rank + cfg.qk_rope_dim, d, cfg.qkv_bias)
        norm(Role.ATTN_KV_A_NORM, cfg.kv_lora_rank)
        linear(Role.ATTN_KV_B, cfg.n_heads * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank, False)
        q_out = cfg.n_heads * cfg.v_head_dim  # what the output projection reads
    elif cfg.qkv_layout != "separate":
        linear(Role.ATTN_QKV, q_out + 2 * kv_out, d, cfg.qkv_bias)
    else:
        linear(Role.ATTN_Q, q_out, d, cfg.qkv_bias)
        linear(Role.ATTN_K, kv_out, d, cfg.qkv_bias)
        linear(Role.ATTN_V, kv_out, d, cfg.qkv_bias)
    if cfg.qk_norm:
        norm(Role.ATTN_Q_NORM, hd if cfg.qk_norm_per_head else q_out)
        norm(Role.ATTN_K_NORM, hd if cfg.qk_norm_per_head else kv_out)
    if cfg.post_norms:
        norm(Role.ATTN_POST_NORM, d)
        norm(Role.FFN_POST_NORM, d)
    linear(Role.ATTN_OUT, d, q_out, cfg.out_bias)
    if moe:
        linear(Role.FFN_GATE_INP, cfg.n_experts, d, False)
        if cfg.router_bias:  # added to the scores to choose the experts (DeepSeek-V3's name)
            params[(Role.FFN_EXP_PROBS_B, "e_score_correction_bias")] = (cfg.n_experts,)
        if cfg.shared_ffn_dim:
            linear(Role.FFN_GATE_SHEXP, cfg.shared_ffn_dim, d, False)
            linear(Role.FFN_UP_SHEXP, cfg.shared_ffn_dim, d, False)
            linear(Role.FFN_DOWN_SHEXP, d, cfg.shared_ffn_dim, False)
            if cfg.shared_gate:
                linear(Role.FFN_GATE_INP_SHEXP, 1, d, False)
        return params
    if cfg.gate_up_fused:
        linear(Role.FFN_GATE_UP, 2 * cfg.ffn_dim, d, cfg.mlp_bias)
    else:
        if cfg.gated:
            linear(Role.FFN_GATE, cfg.ffn_dim, d, cfg.mlp_bias)
        linear(Role.FFN_UP, cfg.ffn_dim, d, cfg.mlp_bias)
    linear(Role.FFN_DOWN, d, cfg.ffn_dim, cfg.mlp_bias)
    return params


def expert_params(cfg: ModelConfig) -> dict[Param, tuple[int, ...]]:
    """The parameters of one routed expert (a gated MLP without biases), with their shapes."""
    d, f = cfg.hidden_size, cfg.expert_ffn_dim
    return {(Role.FFN_GATE_EXP, "weight"): (f, d), (Role.FFN_UP_EXP, "weight"): (f, d),
            (Role.FFN_DOWN_EXP, "weight"): (d, f)}


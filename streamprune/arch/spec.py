"""An architecture is a table: tensor roles -> checkpoint names, plus a config parser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamprune.arch.config import ModelConfig
from streamprune.arch.roles import Role
from streamprune.fused import FusedExperts

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
    # a parameter's name in the checkpoint where it differs from the one streamprune knows it by (Hunyuan's selection
    # bias `expert_bias` for `e_score_correction_bias`)
    kinds: dict[Param, str] = field(default_factory=dict)
    # how the family's checkpoints may store a block's routed experts in 3-D tensors (fused.py); they are read, and
    # written back, so wherever those are present instead of one tensor per expert
    fused: FusedExperts | None = None
    # name prefixes of tensors outside the language model (a vision tower): copied to the output as they are
    passthrough: tuple[str, ...] = ()
    # the name prefix of multi-token-prediction layers stored apart from the blocks (Qwen3-Next's `mtp.`), copied as
    # they are; and config.json's count of them
    mtp_prefix: str | None = None
    mtp_key: str = "num_nextn_predict_layers"
    # the key of the language model's own section in config.json (an image-text model's "text_config"): the expert
    # count and the MTP layers' count are set there when experts are removed
    text_config: str | None = None

    def text(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The language model's section of a config.json (itself, unless `text_config` names one)."""
        return raw[self.text_config] if self.text_config else raw


def expected_params(cfg: ModelConfig, moe: bool = False, linear_attn: bool = False) -> dict[Param, tuple[int, ...]]:
    """Every parameter the config implies outside the routed experts, with its shape, for a block with routed
    experts (`moe`) or a dense MLP, and linear attention (`linear_attn`) or attention. Roles absent here must not be in
    the file."""
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
    if cfg.per_layer_dim:  # the table of per-layer inputs, the embedding's projection into them and its norm (model-
        every = cfg.n_layers * cfg.per_layer_dim  # wide, each read one block's slice at a time); each block's gate,
        params[(Role.PLE_EMBD, "weight")] = (cfg.per_layer_vocab, every)  # projection and norm
        linear(Role.PLE_MODEL_PROJ, every, d, False)
        norm(Role.PLE_PROJ_NORM, cfg.per_layer_dim)
        linear(Role.PLE_GATE, cfg.per_layer_dim, d, False)
        linear(Role.PLE_PROJ, d, cfg.per_layer_dim, False)
        norm(Role.PLE_POST_NORM, d)
    if cfg.final_norm:
        norm(Role.OUTPUT_NORM, d)
    if not cfg.tie_word_embeddings:
        params[(Role.OUTPUT, "weight")] = (cfg.vocab_size, cfg.embed_dim)
    norm(Role.ATTN_NORM, d)
    norm(Role.FFN_NORM, d)
    if linear_attn:
        linear_attention(cfg, params)
    elif cfg.kv_lora_rank:  # multi-head latent attention
        if cfg.q_lora_rank:
            linear(Role.ATTN_Q_A, cfg.q_lora_rank, d, cfg.qkv_bias)
            norm(Role.ATTN_Q_A_NORM, cfg.q_lora_rank)
            linear(Role.ATTN_Q_B, q_out, cfg.q_lora_rank, False)
        else:
            linear(Role.ATTN_Q, q_out, d, False)
        linear(Role.ATTN_KV_A_MQA, cfg.kv_lora_rank + cfg.qk_rope_dim, d, cfg.qkv_bias)
        norm(Role.ATTN_KV_A_NORM, cfg.kv_lora_rank)
        linear(Role.ATTN_KV_B, cfg.n_heads * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank, False)
        if cfg.index_topk:  # the lightning indexer (LayerNorm of its key, with a bias, whatever the model's norms)
            linear(Role.ATTN_IDX_Q_B, cfg.index_heads * cfg.index_head_dim, cfg.q_lora_rank, False)
            linear(Role.ATTN_IDX_K, cfg.index_head_dim, d, False)
            params[(Role.ATTN_IDX_K_NORM, "weight")] = params[(Role.ATTN_IDX_K_NORM, "bias")] = (cfg.index_head_dim,)
            linear(Role.ATTN_IDX_WEIGHTS, cfg.index_heads, d, False)
        q_out = cfg.n_heads * cfg.v_head_dim  # what the output projection reads
    elif cfg.qkv_layout != "separate":
        linear(Role.ATTN_QKV, q_out + 2 * kv_out, d, cfg.qkv_bias)
    else:
        linear(Role.ATTN_Q, q_out * (2 if cfg.attn_output_gate else 1), d, cfg.qkv_bias)
        if not cfg.kv_reused:  # a block reusing another's keys and values has no k/v projections (nor a k norm)
            linear(Role.ATTN_K, kv_out, d, cfg.qkv_bias)
        if not cfg.values_from_keys and not cfg.kv_reused:
            linear(Role.ATTN_V, kv_out, d, cfg.qkv_bias)
    if cfg.qk_norm and not linear_attn:
        norm(Role.ATTN_Q_NORM, hd if cfg.qk_norm_per_head else q_out)
        if not cfg.kv_reused:
            norm(Role.ATTN_K_NORM, hd if cfg.qk_norm_per_head else kv_out)
    if cfg.post_norms:
        norm(Role.ATTN_POST_NORM, d)
        norm(Role.FFN_POST_NORM, d)
    if not linear_attn:
        linear(Role.ATTN_OUT, d, q_out, cfg.out_bias)
    if cfg.attn_sinks and not linear_attn:
        params[(Role.ATTN_SINKS, "sinks")] = (cfg.n_heads,)
    if cfg.layer_scalar:
        params[(Role.LAYER_SCALAR, "layer_scalar")] = (1,)
    if moe:
        linear(Role.FFN_GATE_INP, cfg.n_experts, d, cfg.router_logit_bias)
        if cfg.router_bias:  # added to the scores to choose the experts (DeepSeek-V3's name)
            shape = (1, cfg.n_experts) if cfg.router_bias_2d else (cfg.n_experts,)
            params[(Role.FFN_EXP_PROBS_B, "e_score_correction_bias")] = shape
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


def linear_attention(cfg: ModelConfig, params: dict[Param, tuple[int, ...]]) -> None:
    """A Gated DeltaNet block's parameters (see delta.py), into `params`."""
    d, nv = cfg.hidden_size, cfg.linear_v_heads
    keys, values = cfg.linear_k_heads * cfg.linear_k_dim, nv * cfg.linear_v_dim
    if cfg.linear_fused_in:
        params[(Role.SSM_IN_QKVZ, "weight")] = (2 * keys + 2 * values, d)
        params[(Role.SSM_IN_BA, "weight")] = (2 * nv, d)
    else:
        params[(Role.SSM_IN_QKV, "weight")] = (2 * keys + values, d)
        params[(Role.SSM_IN_Z, "weight")] = (values, d)
        params[(Role.SSM_IN_B, "weight")] = (nv, d)
        params[(Role.SSM_IN_A, "weight")] = (nv, d)
    params[(Role.SSM_CONV1D, "weight")] = (2 * keys + values, 1, cfg.linear_conv)
    params[(Role.SSM_A, "A_log")] = (nv,)
    params[(Role.SSM_A, "dt_bias")] = (nv,)
    params[(Role.SSM_NORM, "weight")] = (cfg.linear_v_dim,)
    params[(Role.SSM_OUT, "weight")] = (d, values)


def expert_params(cfg: ModelConfig) -> dict[Param, tuple[int, ...]]:
    """The parameters of one routed expert (a gated MLP, with biases where the config says), with their shapes."""
    d, f = cfg.hidden_size, cfg.expert_ffn_dim
    params: dict[Param, tuple[int, ...]] = {(Role.FFN_GATE_EXP, "weight"): (f, d), (Role.FFN_UP_EXP, "weight"): (f, d),
                                            (Role.FFN_DOWN_EXP, "weight"): (d, f)}
    if cfg.expert_bias:
        params.update({(Role.FFN_GATE_EXP, "bias"): (f,), (Role.FFN_UP_EXP, "bias"): (f,),
                       (Role.FFN_DOWN_EXP, "bias"): (d,)})
    return params


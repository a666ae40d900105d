"""The forward pass of one decoder block, of the embedding and of the head, as pure functions.

Weights come in as a dict keyed by (role, "weight" | "bias"); no nn.Module is built. A `tap`
callback, when given, sees the input of every linear site (for Hessian accumulation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from streamprune.arch.config import ModelConfig
from streamprune.arch.layers import (
    activation,
    alibi_causal_bias,
    apply_rope,
    layer_norm,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from streamprune.arch.roles import Role, Site
from streamprune.arch.spec import Param

Weights = dict[Param, Tensor]
Tap = Callable[[Site, Tensor], None]


@dataclass
class Positions:
    """Position information shared by every block for one window length."""

    cos: Tensor | None = None  # (T, hd) RoPE
    sin: Tensor | None = None
    bias: Tensor | None = None  # (H, T, T) ALiBi + causal mask

    def to(self, device: torch.device, dtype: torch.dtype) -> Positions:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return Positions(move(self.cos), move(self.sin), move(self.bias))


def positions(cfg: ModelConfig, seqlen: int) -> Positions:
    if cfg.pos == "rope":
        cos, sin = rope_cos_sin(rope_inv_freq(cfg.head_dim, cfg.rope), seqlen)
        return Positions(cos=cos, sin=sin)
    if cfg.pos == "alibi":
        return Positions(bias=alibi_causal_bias(cfg.n_heads, seqlen))
    return Positions()  # learned positions are added at the embedding


def linear(w: Weights, role: Role, x: Tensor) -> Tensor:
    return F.linear(x, w[(role, "weight")], w.get((role, "bias")))


def norm(cfg: ModelConfig, w: Weights, role: Role, x: Tensor) -> Tensor:
    weight = w.get((role, "weight"))
    if cfg.norm == "rms":
        return rms_norm(x, weight, cfg.norm_eps)
    return layer_norm(x, weight, w.get((role, "bias")), cfg.norm_eps)


def attention(cfg: ModelConfig, w: Weights, x: Tensor, pos: Positions, tap: Tap | None) -> Tensor:
    B, T, _ = x.shape
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if tap:
        tap(Site.ATTN_IN, x)
    if (Role.ATTN_QKV, "weight") in w:
        qkv = linear(w, Role.ATTN_QKV, x).view(B, T, nh, 3, hd)  # BLOOM interleaves per head
        q, k, v = qkv.unbind(dim=3)  # (B, T, nh, hd) each
    else:
        q = linear(w, Role.ATTN_Q, x).view(B, T, nh, hd)
        k = linear(w, Role.ATTN_K, x).view(B, T, nkv, hd)
        v = linear(w, Role.ATTN_V, x).view(B, T, nkv, hd)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
    if pos.cos is not None:
        q, k = apply_rope(q, pos.cos, pos.sin), apply_rope(k, pos.cos, pos.sin)
    if pos.bias is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attn_scale, enable_gqa=nkv != nh)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=pos.bias, scale=cfg.attn_scale, enable_gqa=nkv != nh)
    o = o.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh*hd)
    if tap:
        tap(Site.ATTN_OUT_IN, o)
    return linear(w, Role.ATTN_OUT, o)


def mlp(cfg: ModelConfig, w: Weights, x: Tensor, tap: Tap | None) -> Tensor:
    if tap:
        tap(Site.FFN_IN, x)
    if cfg.gated:
        h = activation(cfg.act, linear(w, Role.FFN_GATE, x)) * linear(w, Role.FFN_UP, x)
    else:
        h = activation(cfg.act, linear(w, Role.FFN_UP, x))
    if tap:
        tap(Site.FFN_DOWN_IN, h)
    return linear(w, Role.FFN_DOWN, h)


def block_forward(cfg: ModelConfig, w: Weights, x: Tensor, pos: Positions, tap: Tap | None = None) -> Tensor:
    """One decoder block on (B, T, D) hidden states."""
    if not cfg.norm_before:  # OPT-350m: norm after each residual add
        h = norm(cfg, w, Role.ATTN_NORM, x + attention(cfg, w, x, pos, tap))
        return norm(cfg, w, Role.FFN_NORM, h + mlp(cfg, w, h, tap))
    a = norm(cfg, w, Role.ATTN_NORM, x)
    h = (a if cfg.residual_from_norm else x) + attention(cfg, w, a, pos, tap)
    m = norm(cfg, w, Role.FFN_NORM, h)
    return (m if cfg.residual_from_norm else h) + mlp(cfg, w, m, tap)


def embed(cfg: ModelConfig, w: Weights, ids: Tensor) -> Tensor:
    """Token ids (B, T) -> hidden states (B, T, D) entering block 0."""
    x = F.embedding(ids, w[(Role.TOKEN_EMBD, "weight")])  # (B, T, embed_dim)
    if (Role.PROJ_IN, "weight") in w:
        x = linear(w, Role.PROJ_IN, x)
    if cfg.pos == "learned":
        idx = torch.arange(ids.shape[1], device=ids.device) + cfg.pos_offset
        x = x + F.embedding(idx, w[(Role.POS_EMBD, "weight")])  # (T, D) broadcast over B
    if cfg.embed_norm:
        x = norm(cfg, w, Role.EMBD_NORM, x)
    return x


def head(cfg: ModelConfig, w: Weights, x: Tensor) -> Tensor:
    """Hidden states after the last block -> logits (B, T, vocab)."""
    if cfg.final_norm:
        x = norm(cfg, w, Role.OUTPUT_NORM, x)
    if (Role.PROJ_OUT, "weight") in w:
        x = linear(w, Role.PROJ_OUT, x)
    lm_head = w.get((Role.OUTPUT, "weight"))
    if lm_head is None:  # tied to the input embedding
        lm_head = w[(Role.TOKEN_EMBD, "weight")]
    return F.linear(x, lm_head)

"""The forward pass of one decoder block, of the embedding and of the head, as pure functions.

Weights come in as a dict keyed by (role, "weight" | "bias"); no nn.Module is built. A `tap`
callback, when given, sees the input of every linear site (for Hessian accumulation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from streamprune.arch.config import ModelConfig
from streamprune.arch.delta import gated_delta_net
from streamprune.arch.layers import (
    activation,
    alibi_causal_bias,
    apply_rope,
    chunk_causal_bias,
    layer_norm,
    window_causal_bias,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from streamprune.arch.roles import Role, Site
from streamprune.arch.spec import Param
from streamprune.errors import UnsupportedModelError

Weights = dict[Param, Tensor]
Tap = Callable[[Site, Tensor], None]
# An MoE block's routed experts: called with the MoE input (B, T, D), returns their weighted sum, or None when the
# caller adds it later (experts streamed one at a time over every window; see forward.py).
Routed = Callable[[Tensor], Tensor | None]


@dataclass
class Positions:
    """What the blocks of one kind (full, sliding or chunked attention, with or without RoPE) attend with, for one
    window length."""

    cos: Tensor | None = None  # (T, rotated features) RoPE
    sin: Tensor | None = None
    bias: Tensor | None = None  # additive, -inf where unseen: ALiBi's (1, H, T, T) or a window's or chunks' (1, 1, T, T)
    q_scale: Tensor | None = None  # (T,) each position's query multiplied by it (Llama 4's NoPE temperature)

    def to(self, device: torch.device, dtype: torch.dtype) -> Positions:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return Positions(move(self.cos), move(self.sin), move(self.bias), move(self.q_scale))


@dataclass
class Carried:
    """What one batch of windows brings a block beside its hidden states: its per-layer inputs ((B, T, per_layer_dim):
    Gemma 4's edge models); the keys and values of the earlier block it reuses ((B, kv heads, T, head dim) each,
    normalized and rotated: Gemma 4's shared key-values); and, where later blocks reuse this one's, what takes them."""

    per_layer: Tensor | None = None
    kv: tuple[Tensor, Tensor] | None = None
    keep_kv: Callable[[Tensor, Tensor], None] | None = None


@dataclass
class LayerPositions:
    """Positions of every kind of block in a model, shared by the blocks of that kind."""

    kinds: dict[str, Positions]  # by position kind (ModelConfig.position_kind)
    block_kinds: tuple[str, ...]  # of each block

    def of(self, bid: int) -> Positions:
        return self.kinds[self.block_kinds[bid]]

    def to(self, device: torch.device, dtype: torch.dtype) -> LayerPositions:
        return LayerPositions({kind: p.to(device, dtype) for kind, p in self.kinds.items()}, self.block_kinds)


@dataclass(frozen=True)
class Kind:
    """How the blocks of one position kind attend over windows of one length: RoPE's parameters (None: no RoPE),
    and the sliding window or the chunk that masks what they see (None: none shorter than the window)."""

    rope: dict[str, Any] | None
    window: int | None = None
    chunk: int | None = None
    rotary_dim: int = 0  # the features of each head RoPE rotates (the blocks' own heads': Gemma 4's global ones wider)

    @property
    def masked(self) -> bool:
        """Whether a (T, T) mask is held for these blocks."""
        return self.window is not None or self.chunk is not None


def layer_kinds(cfg: ModelConfig, seqlen: int) -> dict[str, Kind]:
    """Each position kind in the model (ModelConfig.position_kind) and how its blocks attend over `seqlen` tokens."""
    kinds = {}
    for bid in range(cfg.n_layers):
        name, layer_type = cfg.position_kind(bid), cfg.layer_types[bid]
        if name in kinds:
            continue
        window, chunk = cfg.window(layer_type), cfg.chunk(layer_type)
        rope = cfg.rope_sliding if layer_type == "sliding_attention" and cfg.rope_sliding is not None else cfg.rope
        positional = cfg.pos == "rope" and layer_type != "linear_attention" and bid not in cfg.nope_layers
        kinds[name] = Kind(rope if positional else None, window if window is not None and window < seqlen else None,
                           chunk if chunk is not None and chunk < seqlen else None,
                           cfg.block(bid).rotary_dim if positional else 0)
    return kinds


def positions(cfg: ModelConfig, seqlen: int) -> LayerPositions:
    kinds = {}
    for name, kind in layer_kinds(cfg, seqlen).items():
        if cfg.pos == "alibi":
            assert not kind.masked, "ALiBi models have no sliding window"
            kinds[name] = Positions(bias=alibi_causal_bias(cfg.n_heads, seqlen))
            continue
        p = Positions()  # the delta rule's state carries the order of the tokens; learned positions are embedded
        if kind.rope is not None:
            inv_freq = rope_inv_freq(kind.rotary_dim, kind.rope, seqlen)
            p.cos, p.sin = rope_cos_sin(inv_freq, seqlen, kind.rope.get("attention_factor", 1.0))
        if kind.window is not None:
            p.bias = window_causal_bias(seqlen, kind.window)
        elif kind.chunk is not None:
            p.bias = chunk_causal_bias(seqlen, kind.chunk)
        if name.endswith(":nope") and cfg.nope_temperature is not None:
            floor_scale, attn_scale = cfg.nope_temperature
            where = torch.arange(seqlen, dtype=torch.float32)
            p.q_scale = torch.log1p(torch.floor((where + 1.0) / floor_scale)) * attn_scale + 1.0
        kinds[name] = p
    return LayerPositions(kinds, tuple(cfg.position_kind(bid) for bid in range(cfg.n_layers)))


def param(w: Weights, role: Role, kind: str, x: Tensor) -> Tensor | None:
    """A parameter in the compute dtype of `x`: weights may be held as stored (bf16, fp16) and are
    upcast exactly, one at a time, when used."""
    t = w.get((role, kind))
    return None if t is None else t.to(x.dtype)


def linear(w: Weights, role: Role, x: Tensor) -> Tensor:
    weight = param(w, role, "weight", x)
    assert weight is not None, role
    return F.linear(x, weight, param(w, role, "bias", x))


def norm(cfg: ModelConfig, w: Weights, role: Role, x: Tensor) -> Tensor:
    weight = param(w, role, "weight", x)
    if cfg.norm == "rms":
        return rms_norm(x, weight, cfg.norm_eps, cfg.norm_offset)
    return layer_norm(x, weight, param(w, role, "bias", x), cfg.norm_eps)


def attend(cfg: ModelConfig, w: Weights, x: Tensor, pos: Positions,
           keep_kv: Callable[[Tensor, Tensor], None] | None = None) -> Tensor:
    """Multi-head attention up to (not including) the output projection; `keep_kv` takes the keys and values, as
    attended, where later blocks reuse them."""
    B, T, _ = x.shape
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if cfg.qkv_layout == "per_head":  # BLOOM interleaves q, k, v per head
        q, k, v = linear(w, Role.ATTN_QKV, x).view(B, T, nh, 3, hd).unbind(dim=3)  # (B, T, nh, hd) each
    elif cfg.qkv_layout == "concat":  # Phi-3: all query rows, then all key rows, then all value rows
        q, k, v = linear(w, Role.ATTN_QKV, x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
    else:
        q, k = linear(w, Role.ATTN_Q, x), linear(w, Role.ATTN_K, x)
        v = linear(w, Role.ATTN_V, x) if (Role.ATTN_V, "weight") in w else k  # Gemma 4's global blocks: the keys'
        # the heads' width and key-value heads as this block's weights have them (Gemma 4's global blocks: their own)
        hd = q.shape[-1] // (nh * (2 if cfg.attn_output_gate else 1))
        nkv = k.shape[-1] // hd
        if cfg.attn_output_gate:  # each head's query features, then its output gate's (Qwen3-Next)
            q, gate = q.view(B, T, nh, 2 * hd).chunk(2, dim=-1)  # (B, T, nh, hd) each
        if cfg.qk_norm and not cfg.qk_norm_per_head:  # over all heads' features at once (MiniMax-M2)
            q, k = norm(cfg, w, Role.ATTN_Q_NORM, q), norm(cfg, w, Role.ATTN_K_NORM, k)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
    if cfg.qk_norm and cfg.qk_norm_per_head:  # over each head's hd features
        q, k = norm(cfg, w, Role.ATTN_Q_NORM, q), norm(cfg, w, Role.ATTN_K_NORM, k)
    if cfg.v_norm:
        v = rms_norm(v, None, cfg.norm_eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
    if pos.cos is not None:
        q, k = (apply_rope(t, pos.cos, pos.sin, cfg.rope_interleave) for t in (q, k))
        if cfg.qk_unit_norm:
            q, k = rms_norm(q, None, cfg.norm_eps), rms_norm(k, None, cfg.norm_eps)
    if pos.q_scale is not None:
        q = q * pos.q_scale[:, None]
    if keep_kv is not None:
        keep_kv(k, v)
    sinks, scale = param(w, Role.ATTN_SINKS, "sinks", q), cfg.scale_for(hd)
    if cfg.attn_softcap is None and sinks is None:
        o = fused_attention(q, k, v, pos.bias, scale)
    else:
        o = explicit_attention(q, k, v, pos.bias, scale, cfg.attn_softcap, sinks, score_rows(cfg, T))
    o = o.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh*hd)
    return o * torch.sigmoid(gate.reshape(B, T, nh * hd)) if cfg.attn_output_gate else o


def attend_shared(cfg: ModelConfig, w: Weights, x: Tensor, pos: Positions, kv: tuple[Tensor, Tensor]) -> Tensor:
    """Attention of a block that reuses an earlier block's keys and values (Gemma 4's shared key-values): its own
    queries (normalized per head, rotated) over `kv`, up to the output projection."""
    B, T, _ = x.shape
    k, v = kv
    q = linear(w, Role.ATTN_Q, x).view(B, T, cfg.n_heads, k.shape[-1])
    q = norm(cfg, w, Role.ATTN_Q_NORM, q).transpose(1, 2)  # (B, nh, T, hd)
    if pos.cos is not None:
        q = apply_rope(q, pos.cos, pos.sin, cfg.rope_interleave)
    o = fused_attention(q, k, v, pos.bias, cfg.scale_for(k.shape[-1]))
    return o.transpose(1, 2).reshape(B, T, -1)


def attend_latent(cfg: ModelConfig, w: Weights, x: Tensor, pos: Positions,
                  stop_at: Callable[[Site, Tensor], bool]) -> Tensor | None:
    """Multi-head latent attention (DeepSeek-V3) up to the output projection; None when stopped at one of its sites.
    Each head's query and key: `qk_nope_dim` features from the latents, then `qk_rope_dim` rotated ones (the key's
    shared by every head, from kv_a); its value `v_head_dim` features."""
    B, T, _ = x.shape
    nh, nope, rope, dv = cfg.n_heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        latent = rms_norm(linear(w, Role.ATTN_Q_A, x), param(w, Role.ATTN_Q_A_NORM, "weight", x), cfg.latent_norm_eps)
        if stop_at(Site.ATTN_Q_B_IN, latent):
            return None
        q = linear(w, Role.ATTN_Q_B, latent)
    else:
        q = linear(w, Role.ATTN_Q, x)
    kv_latent, k_rot = linear(w, Role.ATTN_KV_A_MQA, x).split([cfg.kv_lora_rank, rope], dim=-1)
    kv_latent = rms_norm(kv_latent, param(w, Role.ATTN_KV_A_NORM, "weight", x), cfg.latent_norm_eps)
    if stop_at(Site.ATTN_KV_B_IN, kv_latent):
        return None
    k_nope, v = linear(w, Role.ATTN_KV_B, kv_latent).view(B, T, nh, nope + dv).transpose(1, 2).split([nope, dv], -1)
    q_nope, q_rot = q.view(B, T, nh, nope + rope).transpose(1, 2).split([nope, rope], dim=-1)  # (B, nh, T, .)
    q_rot, k_rot = (apply_rope(t, pos.cos, pos.sin, cfg.rope_interleave) for t in (q_rot, k_rot.view(B, 1, T, rope)))
    q = torch.cat((q_nope, q_rot), dim=-1)
    k = torch.cat((k_nope, k_rot.expand(B, nh, T, rope)), dim=-1)
    bias = pos.bias
    if cfg.index_topk and cfg.index_topk < T:  # DeepSeek sparse attention: only the keys the indexer picks
        bias = indexed_bias(cfg, w, x, latent, pos)
    o = fused_attention(q, k, v, bias, cfg.attn_scale)  # (B, nh, T, dv)
    return o.transpose(1, 2).reshape(B, T, nh * dv)


def indexed_bias(cfg: ModelConfig, w: Weights, x: Tensor, latent: Tensor, pos: Positions) -> Tensor:
    """The additive mask (B, 1, T, T) of DeepSeek sparse attention: each query sees the `index_topk` earlier keys its
    lightning indexer scores highest, -inf elsewhere. A key's score for a query is the sum over the indexer's heads of
    the head's weight (from the block's input) times relu(q . k / sqrt(index_head_dim)), in float32: per-head queries
    from the query latent, one key from the block's input through its LayerNorm, their first qk_rope_dim features
    rotated. Scored `index_rows` queries at a time: (B, rows, heads, T), never (B, T, heads, T)."""
    B, T, _ = x.shape
    nh, hd, rope = cfg.index_heads, cfg.index_head_dim, cfg.qk_rope_dim
    q = linear(w, Role.ATTN_IDX_Q_B, latent).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    k = layer_norm(linear(w, Role.ATTN_IDX_K, x), param(w, Role.ATTN_IDX_K_NORM, "weight", x),
                   param(w, Role.ATTN_IDX_K_NORM, "bias", x), 1e-6)[:, None]  # (B, 1, T, hd)
    q, k = (torch.cat((apply_rope(t[..., :rope], pos.cos, pos.sin, cfg.index_rope_interleave), t[..., rope:]), dim=-1)
            for t in (q, k))
    q, k = q.transpose(1, 2).float(), k.transpose(-1, -2).float()  # (B, T, nh, hd), (B, 1, hd, T)
    weights = linear(w, Role.ATTN_IDX_WEIGHTS, x).float() * nh ** -0.5  # (B, T, nh)
    bias = torch.full((B, 1, T, T), float("-inf"), device=x.device, dtype=x.dtype)
    keys, rows = torch.arange(T, device=x.device), index_rows(cfg, T)
    for i in range(0, T, rows):
        j = min(i + rows, T)
        scores = torch.relu(torch.matmul(q[:, i:j], k) * hd ** -0.5)  # (B, rows, nh, T)
        index = torch.matmul(weights[:, i:j, None], scores)[:, :, 0]  # (B, rows, T)
        future = keys[None, :] > keys[i:j, None]  # (rows, T)
        index.masked_fill_(future, float("-inf"))
        chosen = torch.zeros_like(index, dtype=torch.bool).scatter_(-1, index.topk(cfg.index_topk, dim=-1).indices, True)
        bias[:, 0, i:j].masked_fill_(chosen & ~future, 0.0)
    return bias


def index_rows(cfg: ModelConfig, seqlen: int) -> int:
    """Queries per chunk of the sparse attention's indexer: the (rows, index heads, T) scores of a window take about as
    much as one (T, hidden) hidden state."""
    return max(1, min(seqlen, cfg.hidden_size // max(cfg.index_heads, 1)))


def score_rows(cfg: ModelConfig, seqlen: int) -> int:
    """Queries per chunk of explicit attention: the (H, rows, T) scores of a window take about as much as one
    (T, hidden) hidden state."""
    return max(1, min(seqlen, cfg.hidden_size // cfg.n_heads))


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, cap: float | None,
                       sinks: Tensor | None, rows: int) -> Tensor:
    """Causal attention (B, H, T, hd) -> (B, H, T, hd) whose logits no fused kernel computes: soft-capped, cap *
    tanh(logits / cap), before the mask (Gemma 2), or beside a learned logit per head (`sinks`, (H,)) that joins each
    query's softmax and whose value is zero (gpt-oss). The scores are computed, but `rows` queries at a time: (B, H,
    rows, T), never (B, H, T, T). `bias` is an additive (1, 1, T, T) window mask with the causal one in it; None is
    plain causal."""
    B, H, T, hd = q.shape
    nkv = k.shape[1]
    q = q.view(B, nkv, H // nkv, T, hd)  # query heads grouped by the key head they share
    k, v = k[:, :, None], v[:, :, None]  # (B, nkv, 1, T, hd)
    out = torch.empty_like(q)
    keys = torch.arange(T, device=q.device)
    sink = None if sinks is None else sinks.view(1, nkv, H // nkv, 1, 1)  # beside each query's scores
    for i in range(0, T, rows):
        j = min(i + rows, T)
        s = torch.matmul(q[:, :, :, i:j], k.transpose(-1, -2)).mul_(scale)  # (B, nkv, H/nkv, rows, T)
        if cap is not None:
            s.div_(cap).tanh_().mul_(cap)
        if bias is None:
            s.masked_fill_(keys[None, :] > keys[i:j, None], float("-inf"))  # (rows, T): the future
        else:
            s.add_(bias[0, 0, i:j])  # (rows, T)
        if sink is None:
            p = torch.softmax(s, dim=-1)
        else:  # the sink's share of the softmax goes nowhere
            p = torch.softmax(torch.cat((s, sink.expand(*s.shape[:-1], 1)), dim=-1), dim=-1)[..., :-1]
        out[:, :, :, i:j] = torch.matmul(p, v)
        del s, p
    return out.view(B, H, T, hd)


FUSED_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def fused_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """Causal attention (B, H, T, hd) -> (B, H, T, hd) by a kernel that never materializes the (B, H, T, T)
    scores. On CUDA, float32 q/k/v run on the memory-efficient kernel, which takes no grouped k/v: they are
    expanded to every query head; the math kernel is excluded, so no silent fallback can exceed the plan."""
    gqa = k.shape[1] != q.shape[1]
    if not q.is_cuda:  # the CPU's fused kernel takes float32, grouped k/v and a (1, H, T, T) bias as they are
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # (B, H, T, hd)
    try:
        with sdpa_kernel(FUSED_KERNELS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None, scale=scale)
    except RuntimeError as e:  # raised before any work is done when no fused kernel takes these inputs
        if "No available kernel" not in str(e):
            raise
        raise UnsupportedModelError(
            f"no fused attention kernel of torch {torch.__version__} on {torch.cuda.get_device_name(q.device)} "
            f"takes {q.dtype} q/k/v of shape {list(q.shape)}{' with a bias' if bias is not None else ''}; the math "
            f"kernel would hold (B, H, T, T) scores the memory plan does not count ({e})") from e


def ffn_hidden(cfg: ModelConfig, w: Weights, x: Tensor, gate: Role = Role.FFN_GATE, up: Role = Role.FFN_UP) -> Tensor:
    """The MLP's hidden activations, input of the down projection (of a routed or shared expert: its roles)."""
    if cfg.gate_up_fused and gate is Role.FFN_GATE:
        g, u = linear(w, Role.FFN_GATE_UP, x).chunk(2, dim=-1)  # (B, T, ffn_dim) each
        return activation(cfg.act, g) * u
    if cfg.swiglu_limit is not None:  # gpt-oss's clamped SwiGLU
        g = linear(w, gate, x).clamp(max=cfg.swiglu_limit)
        u = linear(w, up, x).clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
        return g * torch.sigmoid(cfg.swiglu_alpha * g) * (u + 1)
    if cfg.gated:
        return activation(cfg.act, linear(w, gate, x)) * linear(w, up, x)
    return activation(cfg.act, linear(w, up, x))


def expert_hidden(cfg: ModelConfig, w: Weights, x: Tensor) -> Tensor:
    """A routed expert's hidden activations for its tokens (n, D) -> (n, expert_ffn_dim)."""
    return ffn_hidden(cfg, w, x, Role.FFN_GATE_EXP, Role.FFN_UP_EXP)


def route(cfg: ModelConfig, w: Weights, m: Tensor) -> tuple[Tensor, Tensor]:
    """The router of an MoE block, as the model computes it, in float32: each expert's score (softmax over the logits,
    or each logit's sigmoid); the `experts_per_tok` best chosen (ties: the lower index) by the scores plus the
    selection bias, where there is one, among the experts of the best `topk_group` groups, where the router is
    group-limited; their scores renormalized where the config says so, times the routed scaling factor.
    (tokens, D) -> chosen experts (tokens, k) and their weights (tokens, k) in m's dtype."""
    if cfg.router in ("topk_softmax", "topk_sigmoid"):  # the top-k logits (with the router's bias, if any), then
        top, chosen = torch.topk(linear(w, Role.FFN_GATE_INP, m), cfg.experts_per_tok, dim=-1)  # (tokens, k)
        if cfg.router == "topk_softmax":  # their softmax (gpt-oss)
            return chosen, torch.softmax(top, dim=-1).to(m.dtype)
        return chosen, torch.sigmoid(top.float()).to(m.dtype)  # or each one's sigmoid (Llama 4)
    if cfg.router == "softmax":  # logits in m's dtype (Mixtral, Qwen-MoE)
        scores = torch.softmax(linear(w, Role.FFN_GATE_INP, m), dim=-1, dtype=torch.float32)  # (tokens, n_experts)
    else:  # logits in float32 (DeepSeek-V3, GLM-4.5, MiniMax-M2)
        scores = torch.sigmoid(F.linear(m.float(), w[(Role.FFN_GATE_INP, "weight")].float()))
    bias = w.get((Role.FFN_EXP_PROBS_B, "e_score_correction_bias"))
    choice = scores if bias is None else scores + bias.float()
    if cfg.n_group > 1:
        n, groups = choice.shape[0], choice.view(choice.shape[0], cfg.n_group, -1)  # (tokens, groups, per group)
        group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)  # (tokens, groups)
        best = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = groups.masked_fill(~allowed[..., None], float("-inf")).view(n, -1)
    chosen = torch.topk(choice, cfg.experts_per_tok, dim=-1).indices
    weights = scores.gather(1, chosen)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.router == "sigmoid" else 0.0))
    if cfg.routed_scaling != 1.0:
        weights = weights * cfg.routed_scaling
    return chosen, weights.to(m.dtype)


def expert_input(cfg: ModelConfig, x: Tensor, weight: Tensor) -> Tensor:
    """What enters a routed expert from its tokens (n, D) routed with weights (n,): the tokens, or where the weight
    is applied before the expert (Llama 4), the tokens times their weights."""
    return x * weight[:, None].to(x.dtype) if cfg.weight_expert_input else x


def expert_output(cfg: ModelConfig, w: Weights, x: Tensor, weight: Tensor) -> Tensor:
    """A routed expert's share of its tokens' (n, D) MoE output, routed with weights (n,): the weight times the
    expert's output, or (Llama 4) the expert's output of its weighted input."""
    y = linear(w, Role.FFN_DOWN_EXP, expert_hidden(cfg, w, expert_input(cfg, x, weight)))
    return y if cfg.weight_expert_input else y * weight[:, None]


def routed_in_memory(cfg: ModelConfig, w: Weights, experts: list[Weights]) -> Routed:
    """The routed experts' weighted sum when every expert of the block is at hand (small models, tests)."""

    def routed(m: Tensor) -> Tensor:
        flat = m.reshape(-1, m.shape[-1])  # (tokens, D)
        chosen, weights = route(cfg, w, flat)
        out = torch.zeros_like(flat)
        for xid, we in enumerate(experts):
            token, slot = torch.where(chosen == xid)
            if token.numel():
                out.index_add_(0, token, expert_output(cfg, we, flat[token], weights[token, slot]))
        return out.view_as(m)

    return routed


def post_norm(cfg: ModelConfig, w: Weights, role: Role, y: Tensor) -> Tensor:
    """A sub-layer's output as added to the residual: normalized first where the family does (Gemma)."""
    return norm(cfg, w, role, y) if cfg.post_norms else y


def block_forward(cfg: ModelConfig, w: Weights, x: Tensor, pos: Positions, tap: Tap | None = None,
                  until: Site | None = None, routed: Routed | None = None, carried: Carried | None = None
                  ) -> Tensor | None:
    """One decoder block on (B, T, D) hidden states.

    `tap(site, a)` sees the input of each linear site; with `until`, the pass stops right after
    that site's input is tapped and returns None (what calibration of that site needs, no more).
    An MoE block (its router in `w`) takes its routed experts as `routed`; what it takes from elsewhere (per-layer
    inputs, shared keys and values) comes as `carried`.
    """

    def stop_at(site: Site, a: Tensor) -> bool:
        if tap:
            tap(site, a)
        return site is until

    pre = cfg.norm_before  # False: OPT-350m, which normalizes after each residual add
    a = norm(cfg, w, Role.ATTN_NORM, x) if pre else x
    if stop_at(Site.ATTN_IN, a):
        return None
    o = mix(cfg, w, a, pos, stop_at, carried)
    if o is None:
        return None
    if stop_at(Site.ATTN_OUT_IN, o):
        return None
    out_proj = linear(w, Role.SSM_OUT if (Role.SSM_OUT, "weight") in w else Role.ATTN_OUT, o)
    h = (a if cfg.residual_from_norm else x) + post_norm(cfg, w, Role.ATTN_POST_NORM, out_proj)
    h = h if pre else norm(cfg, w, Role.ATTN_NORM, h)
    m = norm(cfg, w, Role.FFN_NORM, h) if pre else h
    if stop_at(Site.FFN_IN, m):
        return None
    if (Role.FFN_GATE_INP, "weight") in w:
        y = moe_mlp(cfg, w, m, stop_at, routed)
        if y is None:
            return None
    else:
        g = ffn_hidden(cfg, w, m)
        if stop_at(Site.FFN_DOWN_IN, g):
            return None
        y = linear(w, Role.FFN_DOWN, g)
    out = (m if cfg.residual_from_norm else h) + post_norm(cfg, w, Role.FFN_POST_NORM, y)
    if cfg.per_layer_dim:  # its per-layer input, gated by the block's output, projected back onto the residual stream
        assert carried is not None and carried.per_layer is not None, "a block with per-layer inputs needs its own"
        if stop_at(Site.PLE_IN, out):
            return None
        g = activation(cfg.act, linear(w, Role.PLE_GATE, out)) * carried.per_layer
        if stop_at(Site.PLE_PROJ_IN, g):
            return None
        out = out + norm(cfg, w, Role.PLE_POST_NORM, linear(w, Role.PLE_PROJ, g))
    if cfg.layer_scalar:
        out = out * param(w, Role.LAYER_SCALAR, "layer_scalar", out)
    return out if pre else norm(cfg, w, Role.FFN_NORM, out)


def mix(cfg: ModelConfig, w: Weights, a: Tensor, pos: Positions, stop_at: Callable[[Site, Tensor], bool],
        carried: Carried | None = None) -> Tensor | None:
    """The block's token mixer up to its output projection, of the kind its weights are: linear attention (Gated
    DeltaNet), multi-head latent attention, attention over an earlier block's keys and values, or attention."""
    if (Role.SSM_OUT, "weight") in w:
        return gated_delta_net(cfg, w, a)
    if cfg.kv_lora_rank:
        return attend_latent(cfg, w, a, pos, stop_at)
    if carried is not None and carried.kv is not None:
        return attend_shared(cfg, w, a, pos, carried.kv)
    return attend(cfg, w, a, pos, None if carried is None else carried.keep_kv)


def moe_mlp(cfg: ModelConfig, w: Weights, m: Tensor, stop_at: Callable[[Site, Tensor], bool],
            routed: Routed | None) -> Tensor | None:
    """An MoE block's MLP: the gated shared expert, if any, plus the routed experts; None when stopped at a site."""
    y = torch.zeros_like(m)
    if (Role.FFN_GATE_SHEXP, "weight") in w:
        g = ffn_hidden(cfg, w, m, Role.FFN_GATE_SHEXP, Role.FFN_UP_SHEXP)
        if stop_at(Site.SHEXP_DOWN_IN, g):
            return None
        y = linear(w, Role.FFN_DOWN_SHEXP, g)
        if (Role.FFN_GATE_INP_SHEXP, "weight") in w:
            y = torch.sigmoid(linear(w, Role.FFN_GATE_INP_SHEXP, m)) * y
    assert routed is not None, "an MoE block's forward needs its routed experts"
    r = routed(m)
    return y if r is None else y + r


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
    if cfg.embed_scale != 1.0:
        x = x * cfg.embed_scale
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
    logits = F.linear(x, lm_head)
    if cfg.final_softcap is not None:
        logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits

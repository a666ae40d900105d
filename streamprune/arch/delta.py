"""Gated DeltaNet, the linear-attention token mixer of Qwen3-Next and Qwen3.5 (three of every four of their blocks),
beside attention (`block.attend`). Pure functions over a block's weights by role, as the block forward is.

The block's normalized input x is projected to queries and keys (`linear_k_heads` heads of `linear_k_dim`), values
and an output gate z (`linear_v_heads` heads of `linear_v_dim`), and per value head a decay input a and a rate input
b. Queries, keys and values pass a causal depthwise convolution (`linear_conv` taps) and SiLU; queries and keys are
L2-normalized (the queries then scaled by 1/sqrt(linear_k_dim)) and shared by linear_v_heads / linear_k_heads
consecutive value heads. Each value head h carries a state S (linear_k_dim x linear_v_dim), zero at the start of a
window, through the gated delta rule:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = S_t^T q_t
    g_t = -exp(A_log) * softplus(a_t + dt_bias)  (log decay, <= 0),  beta_t = sigmoid(b_t)

The output is RMS-normalized per head (weight w, not 1 + w), multiplied by SiLU(z), and read by `out_proj`.

The rule is computed in chunks of CHUNK tokens with a float32 state: inside a chunk the sequential corrections are
one unit lower-triangular solve, so that a chunk costs a few (C x C) and (C x d) products; the state carries from
chunk to chunk. Qwen3-Next projects q, k, v, z in one matrix grouped by key head (each group: its q, k, then the v
and z of its value heads) and b, a likewise (`in_proj_qkvz`, `in_proj_ba`); Qwen3.5 in four (`in_proj_qkv` with
every q, then every k, then every v; `in_proj_z`, `in_proj_b`, `in_proj_a`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamprune.arch.config import ModelConfig
from streamprune.arch.roles import Role

CHUNK = 64  # tokens per chunk of the delta rule (transformers' and flash-linear-attention's default)
L2_EPS = 1e-6  # of the queries' and keys' L2 normalization


def projections(cfg: ModelConfig, w: dict, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B, T, D) -> the convolution's input [q | k | v] (B, T, 2 nk dk + nv dv), z (B, T, nv, dv), b and a
    (B, T, nv), from the fused (Qwen3-Next) or the split (Qwen3.5) projections."""
    B, T, _ = x.shape
    nk, nv, dk, dv = cfg.linear_k_heads, cfg.linear_v_heads, cfg.linear_k_dim, cfg.linear_v_dim
    r = nv // nk  # value heads per key head
    if (Role.SSM_IN_QKVZ, "weight") in w:
        grouped = lin(w, Role.SSM_IN_QKVZ, x).view(B, T, nk, 2 * dk + 2 * r * dv)
        q, k, v, z = grouped.split([dk, dk, r * dv, r * dv], dim=-1)  # (B, T, nk, .) each
        b, a = lin(w, Role.SSM_IN_BA, x).view(B, T, nk, 2 * r).split([r, r], dim=-1)
        qkv = torch.cat((q.reshape(B, T, nk * dk), k.reshape(B, T, nk * dk), v.reshape(B, T, nv * dv)), dim=-1)
        return qkv, z.reshape(B, T, nv, dv), b.reshape(B, T, nv), a.reshape(B, T, nv)
    z = lin(w, Role.SSM_IN_Z, x).view(B, T, nv, dv)
    return lin(w, Role.SSM_IN_QKV, x), z, lin(w, Role.SSM_IN_B, x), lin(w, Role.SSM_IN_A, x)


def lin(w: dict, role: Role, x: Tensor) -> Tensor:
    return F.linear(x, w[(role, "weight")].to(x.dtype))


def causal_conv(x: Tensor, weight: Tensor) -> Tensor:
    """Depthwise causal convolution (B, T, C) with `weight` (C, 1, K), then SiLU: output t reads inputs t-K+1..t
    (zeros before the window)."""
    taps = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (taps - 1, 0)), weight.to(x.dtype), groups=x.shape[-1])  # (B, C, T)
    return F.silu(y).transpose(1, 2)


def l2_normalize(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2_EPS)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, chunk: int = CHUNK) -> Tensor:
    """The gated delta rule over windows, the state zero at each window's start: q, k (B, H, T, dk), v (B, H, T, dv),
    log decay g and rate beta (B, H, T), all float32 -> outputs (B, H, T, dv).

    Within a chunk of C tokens starting from state S0, with c_i the cumulative log decay up to token i:
        u = T^-1 (beta v) - T^-1 (beta e^c k) S0     (the corrections; T = I + beta_i e^{c_i - c_j} k_i.k_j, j < i)
        o_i = e^{c_i} q_i S0 + sum_{j <= i} e^{c_i - c_j} (q_i.k_j) u_j
        S = e^{c_C} S0 + sum_j e^{c_C - c_j} k_j u_j^T
    """
    B, H, T, dk = k.shape
    dv = v.shape[-1]
    pad = -T % chunk
    if pad:  # zero keys, values and log decay after the window: they neither read nor change the state
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // chunk
    q, k, v = (t.reshape(B, H, n, chunk, t.shape[-1]).contiguous() for t in (q, k, v))  # (B, H, n, C, d)
    c = g.reshape(B, H, n, chunk).cumsum(dim=-1)  # (B, H, n, C)
    beta = beta.reshape(B, H, n, chunk, 1)
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)  # j > i
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(later, float("-inf")).exp()  # (B, H, n, C, C): e^{c_i-c_j}
    system = (beta * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # T below its unit diagonal
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    inverse = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True)  # T^-1, one small solve
    u0 = inverse @ (beta * v)  # u = u0 - w S0
    w = inverse @ (beta * c[..., None].exp() * k)
    scores = q @ k.transpose(-1, -2) * decay  # (B, H, n, C, C), zero above the diagonal
    q_decayed = q * c[..., None].exp()
    k_to_end = k * (c[..., -1:] - c).exp()[..., None]  # e^{c_C - c_j} k_j
    chunk_decay = c[..., -1].exp()[..., None, None]  # (B, H, n, 1, 1)
    state = q.new_zeros(B, H, dk, dv)
    out = torch.empty_like(v)
    for i in range(n):
        u = u0[:, :, i] - w[:, :, i] @ state  # (B, H, C, dv)
        out[:, :, i] = q_decayed[:, :, i] @ state + scores[:, :, i] @ u
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ u
    return out.reshape(B, H, n * chunk, dv)[:, :, :T]


def gated_delta_net(cfg: ModelConfig, w: dict, x: Tensor) -> Tensor:
    """A linear-attention block's mixer up to (not including) its output projection: the normalized input (B, T, D)
    -> (B, T, nv * dv), the input of `out_proj`."""
    B, T, _ = x.shape
    nk, nv, dk, dv = cfg.linear_k_heads, cfg.linear_v_heads, cfg.linear_k_dim, cfg.linear_v_dim
    qkv, z, b, a = projections(cfg, w, x)
    qkv = causal_conv(qkv, w[(Role.SSM_CONV1D, "weight")])
    q, k, v = qkv.split([nk * dk, nk * dk, nv * dv], dim=-1)
    q, k = (l2_normalize(t.float().view(B, T, nk, dk)) for t in (q, k))
    q = q * dk**-0.5
    if nv != nk:  # each key head serves nv / nk consecutive value heads
        q, k = (t.repeat_interleave(nv // nk, dim=2) for t in (q, k))
    beta = torch.sigmoid(b.float())
    a_log, dt_bias = (w[(Role.SSM_A, kind)].float() for kind in ("A_log", "dt_bias"))
    g = -a_log.exp() * F.softplus(a.float() + dt_bias)  # (B, T, nv)
    o = delta_rule(*(t.transpose(1, 2) for t in (q, k, v.float().view(B, T, nv, dv), g, beta)))  # (B, nv, T, dv)
    o = o.transpose(1, 2)  # (B, T, nv, dv)
    normed = o * torch.rsqrt(o.pow(2).mean(dim=-1, keepdim=True) + cfg.norm_eps)
    o = w[(Role.SSM_NORM, "weight")].to(x.dtype) * normed.to(x.dtype) * F.silu(z.float())
    return o.to(x.dtype).reshape(B, T, nv * dv)

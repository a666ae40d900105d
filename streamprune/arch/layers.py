"""Pure building blocks: norms, activations, rotary embeddings, ALiBi."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, offset: float = 0.0) -> Tensor:
    """RMSNorm computed in float32, scaled by (offset + weight) after casting back (as LLaMA does; the block
    forward's activations are float32, so this equals Gemma's scaling before the cast, with 1 + weight in float32)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is None:
        return y
    return (weight if offset == 0.0 else offset + weight.float()) * y


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def rope_inv_freq(head_dim: int, params: dict[str, Any], seqlen: int) -> Tensor:
    """Inverse frequencies of RoPE over `head_dim` rotated features for windows of `seqlen` tokens, with linear,
    Llama 3 or LongRoPE scaling applied."""
    theta = float(params["rope_theta"])
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    rope_type = params["rope_type"]
    if rope_type == "proportional":  # Gemma 4: the first partial_rotary_factor of the head's frequencies, the rest 0
        angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
        inv_freq[angles:] = 0.0
        return inv_freq / float(params.get("factor", 1.0))
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "longrope":  # a divisor per frequency: the long set once a window passes the original context
        key = "long_factor" if seqlen > params["original_max_position_embeddings"] else "short_factor"
        return inv_freq / torch.tensor(params[key], dtype=torch.float32)
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    if rope_type == "yarn":  # each frequency between the original and the interpolated one, by its rotations
        factor, old_len = float(params["factor"]), float(params["original_max_position_embeddings"])
        base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)

        def dim_of(rotations: float) -> float:  # the feature index that turns `rotations` times over old_len
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(float(params.get("beta_fast") or 32)), dim_of(float(params.get("beta_slow") or 1))
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001), 0, 1)
        extrapolated = 1 - ramp
        return (1.0 / (factor * base)) * (1 - extrapolated) + (1.0 / base) * extrapolated
    return inv_freq  # "default"; "dynamic" equals it within the trained length


def rope_cos_sin(inv_freq: Tensor, seqlen: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (T, rotated features) in the rotate-half layout, times `scale` (LongRoPE's attention
    factor)."""
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = False) -> Tensor:
    """Rotate (B, H, T, hd) queries or keys by position: the first cos.shape[-1] features of each head (all of them
    unless the rotary is partial), the rest passed through. Interleaved, the features rotated together are (2i, 2i + 1):
    they are gathered into the rotate-half order first (evens, then odds), the same for queries and keys, which leaves
    their dot products those of the interleaved rotation."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleave:
        x_rot = torch.cat((x_rot[..., 0::2], x_rot[..., 1::2]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if rot == x.shape[-1] else torch.cat((out, x_pass), dim=-1)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes; head counts that are not powers of two interleave a second series."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, closest + 1, dtype=torch.float32)
    if closest != n_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes = torch.cat([slopes, extra_base ** torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.float32)])
    return slopes


def alibi_causal_bias(n_heads: int, seqlen: int) -> Tensor:
    """Additive attention bias (1, H, T, T): slope times key position, -inf above the diagonal. Four
    dimensions, broadcast over the batch: the fused attention kernels take a mask only in this form."""
    keys = torch.arange(seqlen, dtype=torch.float32)
    bias = alibi_slopes(n_heads)[:, None, None] * keys[None, None, :]  # (H, 1, T)
    causal = torch.full((seqlen, seqlen), float("-inf")).triu(1)  # (T, T)
    return (bias + causal)[None]  # (1, H, T, T)


def window_causal_bias(seqlen: int, window: int) -> Tensor:
    """Additive attention mask (1, 1, T, T) of a sliding window, shared by every head: query i sees keys
    i - window < j <= i, so `window` tokens, its own included; -inf elsewhere."""
    q = torch.arange(seqlen)[:, None]
    k = torch.arange(seqlen)[None, :]
    seen = (k <= q) & (q - k < window)  # (T, T)
    return torch.zeros(seqlen, seqlen).masked_fill_(~seen, float("-inf"))[None, None]


def chunk_causal_bias(seqlen: int, chunk: int) -> Tensor:
    """Additive attention mask (1, 1, T, T) of chunked attention, shared by every head: query i sees keys j <= i of its
    own chunk (j // chunk == i // chunk); -inf elsewhere."""
    q = torch.arange(seqlen)[:, None]
    k = torch.arange(seqlen)[None, :]
    seen = (k <= q) & (k // chunk == q // chunk)  # (T, T)
    return torch.zeros(seqlen, seqlen).masked_fill_(~seen, float("-inf"))[None, None]

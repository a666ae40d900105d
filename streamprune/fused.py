"""Routed experts stored fused: a block's experts in one 3-D tensor per projection, as transformers' modules hold them
and as Qwen3.5/3.6 (BF16), gpt-oss, Llama 4 and Gemma 4 are published.

A family's fused layout is one row, `FusedExperts`: the names of its two tensors, gate_up (every expert's gate and
up projections) and down; whether they are stored as the model multiplies them (x @ W, [E, in, out]: `transposed`) or
as a linear's weight ([E, out, in]); and whether gate and up alternate along the output (`interleaved`: even outputs
gate, odd up) or come in two halves, the gate first. A new family that stores its experts fused adds a row.

The model sees one linear per expert and projection, under the name a per-expert checkpoint gives it; each is a
`Piece` of one expert's slice of a fused tensor. A slice is read and written whole, at its own byte range (`NAME[e]`
names expert e's slice of tensor NAME): an expert's gate and up arrive together, so that its slice is put together
once, and the whole tensor is never in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamprune.tensorfile import slice_name


@dataclass(frozen=True)
class FusedExperts:
    """How one family stores a block's routed experts in two 3-D tensors (names relative to the base model's prefix,
    with `{bid}`)."""

    gate_up: str
    down: str
    transposed: bool = False  # [E, in, out], as x @ W reads it; else [E, out, in]
    interleaved: bool = False  # gate and up alternate along the output; else the gate's half, then the up's

    def shapes(self, experts: int, ffn: int, hidden: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of gate_up and down for `experts` experts of width `ffn` over `hidden` features."""
        if self.transposed:
            return (experts, hidden, 2 * ffn), (experts, ffn, hidden)
        return (experts, 2 * ffn, hidden), (experts, hidden, ffn)


# The families' fused layouts, a row each (names relative to the base model's prefix): Qwen3.5/3.6 and Qwen3-Next as
# published in BF16, and the other Qwen MoE families as transformers saves them with save_original_format=False.
QWEN = FusedExperts("layers.{bid}.mlp.experts.gate_up_proj", "layers.{bid}.mlp.experts.down_proj")


@dataclass(frozen=True)
class Piece:
    """One expert's linear (`part`: "gate", "up" or "down") inside a fused tensor `tensor` of shape `shape`."""

    tensor: str
    expert: int
    part: str
    shape: tuple[int, ...]
    row: FusedExperts

    @property
    def slice(self) -> str:
        return slice_name(self.tensor, self.expert)

    def rows(self, n: int) -> slice:
        """Which of the `n` outputs of the expert's gate_up are this piece's."""
        if self.row.interleaved:
            return slice(0 if self.part == "gate" else 1, None, 2)
        return slice(0, n // 2) if self.part == "gate" else slice(n // 2, None)

    def take(self, expert: Tensor) -> Tensor:
        """This piece's weight (out, in) from the expert's slice as stored."""
        weight = expert.T if self.row.transposed else expert  # (out, in)
        return weight if self.part == "down" else weight[self.rows(weight.shape[0])]


def assemble(pieces: dict[str, tuple[Piece, Tensor]]) -> dict[str, Tensor]:
    """Expert slices as stored, from their pieces' weights: `pieces` maps a linear's name to its piece and weight;
    every slice named must have all its pieces there (an expert's gate with its up)."""
    by_slice: dict[str, list[tuple[Piece, Tensor]]] = {}
    for piece, weight in pieces.values():
        by_slice.setdefault(piece.slice, []).append((piece, weight))
    out = {}
    for name, parts in by_slice.items():
        row = parts[0][0].row
        if parts[0][0].part == "down":
            (_, weight), = parts
            out[name] = weight.T.contiguous() if row.transposed else weight.contiguous()
            continue
        have = {piece.part: weight for piece, weight in parts}
        if set(have) != {"gate", "up"}:
            raise ValueError(f"{name}: an expert's gate_up slice needs its gate and up together, got {sorted(have)}")
        gate = have["gate"]
        joined = torch.empty((2 * gate.shape[0], gate.shape[1]), dtype=gate.dtype, device=gate.device)  # (out, in)
        for piece, weight in parts:
            joined[piece.rows(joined.shape[0])] = weight
        out[name] = joined.T.contiguous() if row.transposed else joined
    return out

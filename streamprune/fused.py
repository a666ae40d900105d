"""Routed experts stored fused: a block's experts in one 3-D tensor per projection, as transformers' modules hold them
and as Qwen3.5/3.6 (BF16), gpt-oss, Llama 4 and Gemma 4 are published.

A family's fused layout is one row, `FusedExperts`: the names of its two tensors, gate_up (every expert's gate and
up projections) and down; whether they are stored as the model multiplies them (x @ W, [E, in, out]: `transposed`) or
as a linear's weight ([E, out, in]); whether gate and up alternate along the output (`interleaved`: even outputs
gate, odd up) or come in two halves, the gate first; and whether each has a bias beside it (`<name>_bias`, [E, out]).
A new family that stores its experts fused adds a row.

The model sees one linear per expert and projection, under the name a per-expert checkpoint gives it; each is a
`Piece` of one expert's slice of a fused tensor. A slice is read and written whole, at its own byte range (`NAME[e]`
names expert e's slice of tensor NAME): an expert's gate and up arrive together, so that its slice is put together
once, and the whole tensor is never in memory. A fused tensor stored in a format (MXFP4: `<name>_blocks` and
`<name>_scales`) is sliced the same way, each of its parts along its experts, their rows as the outputs' (an encoded
tensor is never transposed: its rows are always the outputs).
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
    bias: bool = False  # each tensor has its biases beside it, `<name>_bias` [E, out]

    def shapes(self, experts: int, ffn: int, hidden: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of gate_up and down as the model reads them ([E, out, in]) for `experts` experts of width `ffn`
        over `hidden` features."""
        return (experts, 2 * ffn, hidden), (experts, hidden, ffn)


# The families' fused layouts, a row each (names relative to the base model's prefix): Qwen3.5/3.6 and Qwen3-Next as
# published in BF16, and the other Qwen MoE families as transformers saves them with save_original_format=False;
# gpt-oss, whose gate and up alternate, stored as x @ W reads them, with biases (and in MXFP4 as published); Llama 4,
# stored as x @ W reads them, the gate's half first.
QWEN = FusedExperts("layers.{bid}.mlp.experts.gate_up_proj", "layers.{bid}.mlp.experts.down_proj")
GPT_OSS = FusedExperts("layers.{bid}.mlp.experts.gate_up_proj", "layers.{bid}.mlp.experts.down_proj",
                       transposed=True, interleaved=True, bias=True)
LLAMA4 = FusedExperts("layers.{bid}.feed_forward.experts.gate_up_proj", "layers.{bid}.feed_forward.experts.down_proj",
                      transposed=True)


@dataclass(frozen=True)
class Piece:
    """One expert's linear weight or bias (`kind`) of projection `part` ("gate", "up" or "down") inside the fused
    tensor `tensor`, whose shape as the model reads it is `shape` ([E, out, in], or [E, out] for biases)."""

    tensor: str
    expert: int
    part: str
    shape: tuple[int, ...]
    row: FusedExperts
    kind: str = "weight"

    @property
    def slice(self) -> str:
        return slice_name(self.tensor, self.expert)

    @property
    def transposed(self) -> bool:
        """Whether the tensor is stored transposed (a weight of a transposed row, stored dense)."""
        return self.kind == "weight" and self.row.transposed

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the tensor as stored dense."""
        return (self.shape[0], *self.shape[1:][::-1]) if self.transposed else self.shape

    @property
    def siblings(self) -> set[str]:
        """The parts an expert's slice of this tensor holds."""
        return {"down"} if self.part == "down" else {"gate", "up"}

    def rows(self, n: int) -> slice:
        """Which of the `n` outputs of the expert's slice are this piece's."""
        if self.part == "down":
            return slice(None)
        if self.row.interleaved:
            return slice(0 if self.part == "gate" else 1, None, 2)
        return slice(0, n // 2) if self.part == "gate" else slice(n // 2, None)

    def take(self, expert: Tensor, stored_dense: bool = True) -> Tensor:
        """This piece (out, in) or (out,) from the expert's slice as stored (dense: transposed where the row says;
        a format's part: rows first)."""
        value = expert.T if stored_dense and self.transposed else expert
        return value[self.rows(value.shape[0])]


def join(pieces: list[tuple[Piece, Tensor]]) -> Tensor | None:
    """One expert's slice, outputs first ((out, in), or (out,) for biases), from its pieces' values; None until every
    piece of the slice is there (an expert's gate with its up)."""
    if {piece.part for piece, _ in pieces} != pieces[0][0].siblings:
        return None
    if len(pieces) == 1:
        return pieces[0][1]
    first = pieces[0][1]
    joined = torch.empty((2 * first.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device)
    for piece, value in pieces:
        joined[piece.rows(joined.shape[0])] = value
    return joined

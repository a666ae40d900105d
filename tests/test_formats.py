"""Output formats: the compressed-tensors pack-quantized writer against the compressed-tensors package (bit-exact
packing, scales and zero points)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from streamprune.errors import ArgumentError, CheckpointError
from streamprune.formats import CompressedTensorsFormat, format_of, make_format

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402


@dataclass(frozen=True)
class Grid:  # the quantizing solver's grid (streamprune/pruners/quant.py on the quant branch)
    bits: int
    group_size: int
    sym: bool


@dataclass
class Quantized:  # and its result per linear
    codes: Tensor
    scale: Tensor
    zero: Tensor


def rtn(w: Tensor, grid: Grid, fmt: CompressedTensorsFormat, dtype: torch.dtype) -> Quantized:
    """Round-to-nearest on `grid`, with scales as the format stores them for a model of `dtype`."""
    rows, cols = w.shape
    group = cols if grid.group_size == -1 else grid.group_size
    g = w.float().reshape(rows, cols // group, group)  # (rows, groups, group)
    top = 2**grid.bits - 1
    if grid.sym:
        scale = g.abs().amax(-1) / (2 ** (grid.bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (grid.bits - 1))
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / top
        zero = (-lo / scale).round().clamp(0, top)
    scale = fmt.round_scale(scale.clamp(min=1e-8), dtype)
    codes = (g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, top)
    return Quantized(codes.reshape(rows, cols).to(torch.uint8), scale, zero.to(torch.uint8))


def dequantized(q: Quantized, grid: Grid) -> Tensor:
    """The contract's float32 weight: (codes - zero[:, g]) * scale[:, g]."""
    rows, cols = q.codes.shape
    group = cols if grid.group_size == -1 else grid.group_size
    g = torch.arange(cols) // group
    return (q.codes.float() - q.zero.float()[:, g]) * q.scale[:, g]


def scheme(grid: Grid) -> QuantizationScheme:
    strategy = "channel" if grid.group_size == -1 else "group"
    args = QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.sym, strategy=strategy,
                            group_size=None if grid.group_size == -1 else grid.group_size)
    return QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


GRIDS = [Grid(4, 32, True), Grid(4, 32, False), Grid(4, -1, True), Grid(4, -1, False), Grid(8, 16, True),
         Grid(8, -1, False), Grid(2, 32, False), Grid(3, 16, True), Grid(3, 32, False)]


def grid_id(g: Grid) -> str:
    return f"{g.bits}b-{'channel' if g.group_size == -1 else f'g{g.group_size}'}-{'sym' if g.sym else 'asym'}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_packing_matches_compressed_tensors(grid, dtype):
    fmt = CompressedTensorsFormat(grid)
    rows, cols = 13, 96  # rows not a multiple of 32 / bits: the zero points' packing pads along the output dim
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(grid.bits)).to(dtype)
    q = rtn(w, grid, fmt, dtype)
    name = "model.layers.0.mlp.up_proj.weight"
    mine = fmt.encode(name, dequantized(q, grid).to(dtype), q)
    assert {n: (t.dtype, tuple(t.shape)) for n, t in mine.items()} == fmt.tensors(name, dtype, (rows, cols))
    local = {n.removeprefix("model.layers.0.mlp.up_proj."): t for n, t in mine.items()}

    # compressed-tensors compresses the weight the run used, with the stored scale (and its signed zero point); in
    # float32, as its quantize in bfloat16 rounds w / scale to bfloat16 (8-bit codes above 64 would move)
    state = {"weight": fmt.decode(name, mine).float(), "weight_scale": q.scale.to(dtype)}
    if not grid.sym:
        state["weight_zero_point"] = (q.zero.int() - 2 ** (grid.bits - 1)).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, scheme(grid))
    assert set(theirs) == set(local)
    for key in local:
        assert theirs[key].dtype == local[key].dtype, key
        assert torch.equal(theirs[key], local[key]), key

    # and decompresses what the format wrote into what the format decodes, bit for bit
    back = PackedQuantizationCompressor.decompress(local, scheme(grid))["weight"]
    assert back.dtype == dtype
    assert torch.equal(back, fmt.decode(name, mine))
    # which is the contract's float32 weight, rounded once to the model's dtype
    assert torch.equal(fmt.decode(name, mine), dequantized(q, grid).to(dtype))


def test_packed_integers_and_nibble_order():
    """4 bits: eight codes per int32 word, the first in the lowest nibble; the zero points packed down the rows."""
    fmt = CompressedTensorsFormat(Grid(4, -1, False))
    codes = torch.arange(16, dtype=torch.uint8).repeat(8, 1)  # (8, 16): every row 0..15
    zero = torch.arange(8, dtype=torch.uint8)[:, None] + 3  # (8, 1): 3..10
    out = fmt.encode("l.weight", torch.zeros(8, 16), Quantized(codes, torch.ones(8, 1), zero))
    words = out["l.weight_packed"]
    assert words.shape == (8, 2) and words.dtype == torch.int32
    assert words[0, 0].item() == 0x76543210 and words[0, 1].item() == 0xFEDCBA98 - 2**32
    assert out["l.weight_zero_point"].shape == (1, 1) and out["l.weight_zero_point"].item() == 0xA9876543 - 2**32
    assert torch.equal(out["l.weight_shape"], torch.tensor([8, 16]))


def test_refusals():
    with pytest.raises(ArgumentError, match="stores 2, 3, 4, 8 bits, not 5"):
        CompressedTensorsFormat(Grid(5, 32, True))
    with pytest.raises(ArgumentError, match="pass --wbits"):
        make_format("compressed-tensors")
    fmt = CompressedTensorsFormat(Grid(4, 48, True))
    with pytest.raises(ArgumentError, match="64 input columns are not a multiple of the group size 48"):
        fmt.tensors("l.weight", torch.bfloat16, (8, 64))
    q = Quantized(torch.zeros(4, 48, dtype=torch.uint8), torch.full((4, 1), 0.1), torch.full((4, 1), 8))
    with pytest.raises(ValueError, match="not representable in torch.bfloat16: round them with round_scale"):
        fmt.encode("l.weight", torch.zeros(4, 48, dtype=torch.bfloat16), q)
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        format_of({"quantization_config": {"quant_method": "gptq"}})


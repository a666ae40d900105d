"""A uniform quantization grid, kept apart from the solvers (as gptq's `Quantizer.find_params` / `quantize`).

A grid has `bits`, a group size (columns that share one scale and zero point; -1: one group per output row)
and a symmetry. Each group's range is taken over the weights it keeps, always with 0 inside it, so a pruned
weight (0) is exactly on the grid (its code is the zero point) and never stretches the range:

    asymmetric: scale = (max - min) / maxq,   zero = round(-min / scale)      (min <= 0 <= max)
    symmetric:  scale = 2 max|w| / maxq,      zero = (maxq + 1) / 2 = 2**(bits - 1)
    code = clamp(round(w / scale) + zero, 0, maxq),   value = (code - zero) * scale   (float32)

A group whose kept weights are all zero gets scale 1 (its codes are its zero point). SparseGPT asks the grid
to round one column at a time inside its sweep; Wanda and magnitude round their kept weights to the nearest
grid point after masking (`round_to_nearest`, the RTN baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from streamprune.errors import ArgumentError
from streamprune.pruners.factor import rows_per_chunk

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Grid:
    bits: int  # 2, 3, 4 or 8
    group_size: int  # columns per group; -1: one group per output row (all columns)
    sym: bool
    # the dtype scales are stored in (the model's, as a packed checkpoint holds them): each scale is rounded to it
    # before any weight is gridded, so the written weight, dense or packed, is the one the solve went on with
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ArgumentError(f"wbits {self.bits!r} is not one of {', '.join(map(str, BITS))}")
        if self.group_size < 1 and self.group_size != -1:
            raise ArgumentError(f"group size {self.group_size!r} must be positive, or -1 (one group per row)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def columns(self, cols: int) -> int:
        """Columns per group of a matrix with `cols` input columns."""
        return cols if self.group_size == -1 else self.group_size

    def params(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point (float32, integer-valued) of groups whose kept weights span [lo, hi] (lo <= 0 <= hi)."""
        maxq = self.maxq
        scale = torch.maximum(-lo, hi).mul_(2.0 / maxq) if self.sym else (hi - lo).div_(maxq)
        scale = scale.to(self.scale_dtype).float()  # as stored (a no-op for float32)
        scale[scale == 0] = 1.0  # an all-zero group, or one below the stored dtype's resolution
        if self.sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.div(-lo, scale).round_().clamp_(0, maxq)
        return scale, zero

    def codes(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Float32 integer codes of `w` on the grid (scale and zero broadcast against w)."""
        return torch.div(w, scale).round_().add_(zero).clamp_(0, self.maxq)

    def packed_bytes(self, rows: int, cols: int) -> int:
        """Bytes of one (rows x cols) linear packed at `bits` per weight, with a scale per row and group as stored
        (`scale_dtype`) and, when asymmetric, a `bits`-bit zero point per row and group (a symmetric grid's is
        implicit): what the compressed-tensors format writes, up to the int32 words' padding and `weight_shape`."""
        groups = rows * (cols // self.columns(cols))
        zeros = 0 if self.sym else math.ceil(groups * self.bits / 8)
        return math.ceil(rows * cols * self.bits / 8) + self.scale_dtype.itemsize * groups + zeros


@dataclass
class Quantized:
    """The quantized form of one linear: THE CONTRACT the packed output writer codes against.

    The weight the run uses (and writes in the dense format, cast to the checkpoint's dtype: exact for float32)
    is (codes - zero[:, g]) * scale[:, g] in float32, g = column // group_size; a pruned weight has
    code == zero (value 0). The tensors may be transposed views (as PruneResult's weight): call .contiguous().
    """

    codes: Tensor  # uint8 (rows, cols): integers in [0, 2**bits - 1]
    scale: Tensor  # float32 (rows, n_groups)
    zero: Tensor  # uint8 (rows, n_groups), integers in [0, 2**bits - 1]; for sym: 2**(bits-1)
    grid: Grid

    def dequantize(self) -> Tensor:
        """(codes - zero) * scale in float32, (rows, cols)."""
        rows, cols = self.codes.shape
        g = self.grid.columns(cols)
        codes = self.codes.float().reshape(rows, cols // g, g)
        return ((codes - self.zero.float()[:, :, None]) * self.scale[:, :, None]).view(rows, cols)


def kept_range(w: Tensor, removed: Tensor | None, dim: int) -> tuple[Tensor, Tensor]:
    """min and max along `dim` of the weights not `removed`, with 0 always inside: (lo <= 0, hi >= 0)."""
    kept = w if removed is None else w.masked_fill(removed, 0.0)
    return kept.amin(dim).clamp_(max=0.0), kept.amax(dim).clamp_(min=0.0)


def check_group_size(grid: Grid, widths: dict[str, int]) -> None:
    """Refuse a group size that does not divide every pruned matrix's input columns (`widths`: name -> columns),
    naming the first matrix it does not divide and the group sizes that would divide them all."""
    if grid.group_size == -1:
        return
    bad = next((name for name, cols in widths.items() if cols % grid.group_size), None)
    if bad is None:
        return
    common = math.gcd(*widths.values())
    sizes = [g for g in range(1, common + 1) if common % g == 0]
    raise ArgumentError(
        f"group size {grid.group_size} does not divide the {widths[bad]} input columns of {bad}; group sizes that "
        f"divide every pruned matrix: {', '.join(map(str, sizes))}, or -1 (one group per output row)")


@torch.no_grad()
def round_to_nearest(w: Tensor, removed: Tensor, grid: Grid) -> Quantized:
    """Round the kept weights of `w` (rows, cols; float32, its removed weights already 0) in place to their group's
    grid, each group's range from its kept weights; returns the codes. Done in row chunks."""
    rows, cols = w.shape
    g = grid.columns(cols)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, cols // g, device=w.device)
    zero = torch.empty(rows, cols // g, dtype=torch.uint8, device=w.device)
    for r0 in range(0, rows, rows_per_chunk(cols)):
        r1 = min(r0 + rows_per_chunk(cols), rows)
        v = w[r0:r1].view(r1 - r0, cols // g, g)  # (rows, groups, g)
        s, z = grid.params(*kept_range(v, None, 2))  # removed weights are 0 already: they cannot stretch it
        c = grid.codes(v, s[:, :, None], z[:, :, None])
        c = torch.where(removed[r0:r1].view_as(v), z[:, :, None], c)
        torch.mul(c - z[:, :, None], s[:, :, None], out=v)
        codes[r0:r1] = c.view(r1 - r0, cols)
        scale[r0:r1], zero[r0:r1] = s, z
    return Quantized(codes, scale, zero, grid)

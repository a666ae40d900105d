"""SparseGPT (Frantar & Alistarh, 2023): mask selection and OBS weight reconstruction per column block."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from streamprune.errors import ArgumentError
from streamprune.pruners.base import (
    LIBRARY_WORKSPACE,
    Pruner,
    PruneResult,
    damped_hessian_,
    quantized_bytes,
    with_damping_retries,
)
from streamprune.pruners.factor import INVERSE_BLOCK, WORKSPACE_BYTES, inverse_factor_
from streamprune.pruners.masks import Pattern, kth_smallest
from streamprune.pruners.quant import Grid, Quantized, kept_range

INNER_COLUMNS = 16
DEFAULT_BLOCKSIZE = 128
# The sweep's per-column-block temporaries, in units of (rows * blocksize): errors, scales, scores and mask.
SWEEP_BYTES_PER_ELEMENT = 20
# With a grid, a group's provisional masks, a block at a time (its scores, their copy, the mask, the kept weights).
GRID_BYTES_PER_ELEMENT = 13


class SparseGPT(Pruner):
    """The paper's algorithm: H^-1 through its upper Cholesky factor, columns in blocks of
    `blocksize`, adaptive mask selection per block from w^2 / [chol(H^-1)]_cc^2 (N:M per row and
    group of M), OBS updates inside the block and lazy batched updates of the remaining columns."""

    knobs = ("blocksize", "damp")
    solver_matrices = 1  # the inverse factor, built in place (see factor.py)
    solve_bytes_per_element = 5  # float32 W^T and its mask

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                 offload_hessian: bool = False, errors: bool = True, grid: Grid | None = None,
                 blocksize: int = DEFAULT_BLOCKSIZE, damp: float = 0.01) -> None:
        super().__init__(columns, device, sparsity, pattern, offload_hessian, errors, grid)
        self.blocksize = blocksize
        # Columns whose OBS updates are applied one by one before being batched onto the rest of the
        # block; a multiple of M so that every N:M group sees all earlier updates.
        self.inner = min(blocksize, pattern.m * max(1, INNER_COLUMNS // pattern.m) if pattern.structured else INNER_COLUMNS)
        self.damp = damp
        self._hinv: Tensor | None = None
        self._dead: Tensor | None = None
        self.damp_used = damp
        self.retries = 0

    @classmethod
    def check(cls, knobs: dict[str, Any], pattern: Pattern) -> None:
        blocksize, damp = knobs["blocksize"], knobs["damp"]
        if blocksize < 1 or (pattern.structured and blocksize % pattern.m):
            raise ArgumentError(f"blocksize {blocksize!r} must be a positive multiple of M={pattern.m or 1}")
        if not damp > 0:
            raise ArgumentError(f"damp {damp!r} must be positive")

    @classmethod
    def workspace(cls, rows: int, cols: int, widest: int, knobs: dict[str, Any], grid: Grid | None = None) -> int:
        """The largest of: the factorization's row chunks or the blocked inversion's panels (for the widest
        input), the sweep's W^T, mask and per-block temporaries, and the errors' row chunks."""
        chunks = 4 * min(WORKSPACE_BYTES, rows * cols * 4)
        rotation = 2 * min(WORKSPACE_BYTES, widest * widest * 2)
        factorization = max(rotation, 2 * widest * min(widest, INVERSE_BLOCK) * 4)
        blocksize = knobs.get("blocksize", DEFAULT_BLOCKSIZE)
        sweep = cls.solve_bytes_per_element * rows * cols + SWEEP_BYTES_PER_ELEMENT * rows * blocksize
        if grid is not None:
            sweep += quantized_bytes(rows, cols, grid) + GRID_BYTES_PER_ELEMENT * rows * blocksize
        return max(factorization, sweep, chunks) + LIBRARY_WORKSPACE

    @torch.no_grad()
    def _inverse_factor(self) -> tuple[Tensor, Tensor]:
        """Upper Cholesky factor of the damped H^-1 and the dead-input mask; computed once per input.

        The factor is built in place in one d x d buffer (see `factor.py`). With `offload_hessian`,
        X^T X moves to host memory first and its device buffer becomes that one, so the device holds a
        single d x d matrix; otherwise the factor is a second matrix beside X^T X. X^T X itself is kept
        unchanged for the reconstruction errors and for retries with more damping.
        """
        if self._hinv is not None:
            assert self._dead is not None
            return self._hinv, self._dead
        assert self.xtx is not None and self.ntokens, "no calibration batch was added"
        source = self.xtx
        if self.offload_hessian:
            self.xtx = source.to("cpu", copy=True)
            work = source  # the device buffer, reused
        else:
            work = torch.empty_like(source)
        dead = (self.xtx.diagonal() == 0).to(self.device)
        xtx = self.xtx

        def factor(damp: float, attempt: int) -> bool:
            if attempt or not self.offload_hessian:  # offloaded, the device buffer holds X^T X the first time
                work.copy_(xtx)
            return inverse_factor_(damped_hessian_(work, self.ntokens, dead, damp)) == 0

        self.damp_used, self.retries = with_damping_retries(self.damp, factor)
        self._hinv, self._dead = work, dead
        return work, dead

    @torch.no_grad()
    def prune(self, weight: Tensor, zeros: int | None = None) -> PruneResult:
        hinv, dead = self._inverse_factor()
        # Work on W^T (columns, rows): every column of W is then a contiguous row, and the per-column
        # OBS updates touch contiguous memory.
        Wt = torch.empty(weight.shape[1], weight.shape[0], device=self.device)
        Wt.copy_(weight.t())  # one float32 copy, transposed as it is made
        Wt[dead] = 0
        cols, rows = Wt.shape
        mask_t = torch.zeros(cols, rows, dtype=torch.bool, device=self.device)
        n, m = self.pattern.n, self.pattern.m
        sweep = None if self.grid is None else _GridSweep(self.grid, cols, rows, self.device, self.xtx is not None)
        blocks = self._blocks(cols)
        # with `zeros`: each column block removes its share of them exactly (cumulative over the columns)
        counts = None if zeros is None else {(i1, i2): zeros * i2 // cols - zeros * i1 // cols for i1, i2 in blocks}
        for i1, i2 in blocks:
            W1 = Wt[i1:i2]  # (count, rows), a contiguous view: updated in place
            Hinv1 = hinv[i1:i2, i1:i2]
            d = Hinv1.diagonal()
            Err1 = torch.zeros_like(W1)
            mask1 = mask_t[i1:i2]
            if not self.pattern.structured:
                mask1.copy_(self._block_mask(W1, d, None if counts is None else counts[(i1, i2)]))
            scale = mask1 / d[:, None]  # err = (w - q) / d = w * mask / d, one kernel per column
            for j1, j2 in self._sub_blocks(i1, i2):  # the same lazy batching again, inside the block
                for i in range(j1, j2):
                    if self.pattern.structured and i % m == 0:
                        score = W1[i : i + m] ** 2 / d[i : i + m, None] ** 2  # (m, rows)
                        mask1.scatter_(0, i + score.topk(n, dim=0, largest=False).indices, True)
                        scale[i : i + m] = mask1[i : i + m] / d[i : i + m, None]
                    if sweep is None:
                        torch.mul(W1[i], scale[i], out=Err1[i])
                    else:  # err = (w - q) / d with q the grid's value of a kept weight, 0 for a removed one
                        c = i1 + i
                        if c % sweep.width == 0:  # the group's grid, from its current weights
                            sweep.fix(c, *self._group_range(Wt, mask_t, hinv.diagonal(), blocks, c, i2, counts))
                        q = sweep.round(c, W1[i], mask1[i])
                        torch.sub(W1[i], q, out=Err1[i]).div_(d[i])
                    W1[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], Err1[i], alpha=-1.0)  # OBS update, rest of sub-block
                    if sweep is None:
                        W1[i].masked_fill_(mask1[i], 0.0)  # q: the kept weights are unchanged by their own update
                    else:
                        W1[i].copy_(q)
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)  # rest of the block
            Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy update of later columns
        Wt[dead] = 0
        mask_t[dead] = True
        info = {"damp": self.damp_used, "damp_retries": self.retries}
        if sweep is None:
            return PruneResult(Wt.t(), mask_t.t(), info)
        return PruneResult(Wt.t(), mask_t.t(), info, quant=sweep.quantized(),
                           unrounded=None if sweep.unrounded is None else sweep.unrounded.t())

    def _blocks(self, cols: int) -> list[tuple[int, int]]:
        """The column blocks: every `blocksize` columns, and with a grid whose group size does not divide it, also at
        every group start (so that a group's columns are all up to date when its grid is fixed)."""
        starts = set(range(0, cols, self.blocksize))
        if self.grid is not None and self.blocksize % self.grid.columns(cols):
            starts |= set(range(0, cols, self.grid.columns(cols)))
        edges = sorted(starts) + [cols]
        return list(zip(edges[:-1], edges[1:]))

    def _sub_blocks(self, i1: int, i2: int) -> list[tuple[int, int]]:
        """Block-relative spans of `inner` columns whose updates are applied one by one; with a grid, also broken at
        every group start inside the block (for the same reason as `_blocks`)."""
        starts = set(range(0, i2 - i1, self.inner))
        if self.grid is not None:
            g = self.grid.columns(self.columns)
            starts |= {c - i1 for c in range(-(-i1 // g) * g, i2, g)}
        edges = sorted(starts) + [i2 - i1]
        return list(zip(edges[:-1], edges[1:]))

    def _group_range(self, Wt: Tensor, mask_t: Tensor, diag: Tensor, blocks: list[tuple[int, int]], c: int,
                     i2: int, counts: dict[tuple[int, int], int] | None = None) -> tuple[Tensor, Tensor]:
        """The range of the weights the group starting at column `c` keeps, from the current weights (all up to
        date at its first column). The masks already chosen (the current block's; N:M: the group of M at `c`)
        exclude exactly; the group's columns whose masks come later (later blocks of a group wider than
        `blocksize`; later groups of M) are excluded by the mask the same rule chooses from the current weights:
        a provisional mask, used for the range only."""
        e = min(c + self.grid.columns(self.columns), self.columns)
        if self.pattern.structured:
            known = min(e, c + self.pattern.m)
        else:
            known = e if self.sparsity == 0 else min(e, i2)
        lo, hi = kept_range(Wt[c:known], mask_t[c:known], 0)
        if self.pattern.structured:
            spans = [(a, min(a + self.blocksize, e)) for a in range(known, e, self.blocksize)]
        else:
            spans = [(a, b) for a, b in blocks if known <= a and b <= e]
        for a, b in spans:
            x, d = Wt[a:b], diag[a:b]
            if self.pattern.structured:
                score = (x**2 / d[:, None] ** 2).view(-1, self.pattern.m, x.shape[1])  # (groups, m, rows)
                idx = score.topk(self.pattern.n, dim=1, largest=False).indices
                provisional = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True).view_as(x)
            else:
                provisional = self._block_mask(x, d, None if counts is None else counts[(a, b)])
            lo2, hi2 = kept_range(x, provisional, 0)
            torch.minimum(lo, lo2, out=lo)
            torch.maximum(hi, hi2, out=hi)
        return lo, hi

    def _block_mask(self, W1: Tensor, d: Tensor, k: int | None = None) -> Tensor:
        """Adaptive selection over one column block (W1 is transposed: (count, rows)): the lowest
        w^2 / d^2 at the paper's threshold; exactly the `k` lowest when given."""
        if k is not None:
            mask = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                score = (W1**2 / d[:, None] ** 2).flatten()
                mask.view(-1)[score.topk(k, largest=False).indices] = True
            return mask
        if self.sparsity == 0:
            return torch.zeros_like(W1, dtype=torch.bool)
        score = W1**2 / d[:, None] ** 2
        k = int(score.numel() * self.sparsity)
        return score <= kth_smallest(score.flatten(), k)  # sort(score)[k], as the reference does

    def release_solver(self) -> None:
        self._hinv = None

    def free(self) -> None:
        super().free()
        self._hinv = self._dead = None


class _GridSweep:
    """A grid's state inside the sweep (transposed like W^T): each group's scale and zero point, fixed at its first
    column, every column's codes, and (for the errors) each column just before it was rounded."""

    def __init__(self, grid: Grid, cols: int, rows: int, device: torch.device, keep_unrounded: bool) -> None:
        self.grid, self.width = grid, grid.columns(cols)
        self.codes = torch.empty(cols, rows, dtype=torch.uint8, device=device)
        self.scale = torch.empty(cols // self.width, rows, device=device)
        self.zero = torch.empty(cols // self.width, rows, device=device)
        self.unrounded = torch.empty(cols, rows, device=device) if keep_unrounded else None

    def fix(self, c: int, lo: Tensor, hi: Tensor) -> None:
        g = c // self.width
        self.scale[g], self.zero[g] = self.grid.params(lo, hi)

    def round(self, c: int, w: Tensor, removed: Tensor) -> Tensor:
        """Column c's value on its group's grid, 0 where `removed` (its code then the zero point)."""
        g = c // self.width
        s, z = self.scale[g], self.zero[g]
        codes = torch.where(removed, z, self.grid.codes(w, s, z))
        self.codes[c] = codes
        if self.unrounded is not None:
            self.unrounded[c] = w.masked_fill(removed, 0.0)
        return codes.sub_(z).mul_(s)

    def quantized(self) -> Quantized:
        return Quantized(self.codes.t(), self.scale.t(), self.zero.to(torch.uint8).t(), self.grid)

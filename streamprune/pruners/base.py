"""The pruner lifecycle shared by every method: accumulate, prune, free. Each method is one class that
declares what it needs (calibration data, which statistics), its own knobs and its memory terms."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from streamprune.pruners.factor import WORKSPACE_BYTES, rows_per_chunk
from streamprune.pruners.masks import Pattern, nm_mask
from streamprune.errors import StreamPruneError
from streamprune.pruners.quant import Grid, Quantized, round_to_nearest

logger = logging.getLogger(__name__)

LIBRARY_WORKSPACE = 32 * 2**20  # what BLAS, LAPACK or cuSOLVER allocate for themselves during a solve
MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10


def damped_hessian_(h: Tensor, ntokens: int, dead: Tensor, damp: float) -> Tensor:
    """X^T X in `h` made the damped Hessian in place: H = 2 X^T X / n, the dead inputs' diagonal 1, plus `damp`
    times the mean diagonal."""
    h.mul_(2.0 / ntokens)
    diag = h.diagonal()
    diag[dead] = 1.0
    diag.add_(damp * diag.mean())
    return h


def with_damping_retries(damp: float, factor: Callable[[float, int], bool]) -> tuple[float, int]:
    """Call `factor(damp, attempt)` until it succeeds, multiplying the damping by 10 after each failure (at most
    MAX_DAMP_RETRIES times); returns the damping that worked and the number of retries."""
    for attempt in range(MAX_DAMP_RETRIES + 1):
        if factor(damp, attempt):
            return damp, attempt
        logger.warning("Cholesky failed with damping %g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise StreamPruneError(f"the Hessian is not positive definite even with damping {damp / 10:g}; "
                           "the calibration activations may contain NaN or Inf")


@dataclass
class PruneResult:
    weight: Tensor  # float32, pruned (and for SparseGPT, updated) weight; may be a transposed view
    mask: Tensor  # True where a weight was removed; may be a transposed view
    info: dict[str, float] = field(default_factory=dict)
    quant: Quantized | None = None  # with a grid: the codes of `weight`, which is their dequantized value
    # with a grid and X^T X kept for the errors: the weight just before rounding (removed weights 0; for SparseGPT
    # each column as updated by the sweep when it was reached), for the sparsity and quantization errors
    unrounded: Tensor | None = None


class Pruner(ABC):
    """Prunes the linears that read one input.

    `add_batch(x)` accumulates the statistics the method reads, in float32: X^T X as chunked GEMMs (the
    input Hessian is H = 2 X^T X / n), or only its diagonal, the squared norm of each input column;
    `prune(w)` may be called once per linear that reads the same input (q/k/v, gate/up), which all share
    them; `release_solver()` drops what the solve needed beyond X^T X; `reconstruction_error(...)` then scores
    each pruned linear (only when X^T X is kept: always for SparseGPT, on request for the others, for which
    it would be the only reason for a d x d matrix); `free()` releases the rest.
    With `offload_hessian`, X^T X waits in host memory from the start of the solve until the errors
    need it, so the solve's device memory holds at most one d x d matrix (SparseGPT's inverse factor,
    built in X^T X's own buffer) and none for Wanda and magnitude.
    """

    needs_data: ClassVar[bool] = True  # calibration data is required
    statistics: ClassVar[str] = "xtx"  # what the solve reads: "xtx" (X^T X), "norms" (its diagonal) or "" (none)
    knobs: ClassVar[tuple[str, ...]] = ()  # this method's own options (fields of PruneOptions)
    solver_matrices: ClassVar[int] = 0  # d x d float32 matrices the solve adds to X^T X
    # Bytes per element of the largest linear held while it is pruned, beyond its stored copy and the pruned
    # result in the stored dtype.
    solve_bytes_per_element: ClassVar[int] = 0

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                 offload_hessian: bool = False, errors: bool = False, grid: Grid | None = None) -> None:
        self.columns = columns
        self.grid = grid
        self.device = device
        self.sparsity = sparsity
        self.pattern = pattern
        self.offload_hessian = offload_hessian
        keep = self.accumulates(errors)
        self.xtx: Tensor | None = torch.zeros(columns, columns, device=device) if keep == "xtx" else None
        self.sqnorms: Tensor | None = torch.zeros(columns, device=device) if keep == "norms" else None
        self.ntokens = 0

    @classmethod
    def accumulates(cls, errors: bool) -> str:
        """What `add_batch` keeps: X^T X when the method or the reconstruction errors need it."""
        return "xtx" if errors else cls.statistics

    @classmethod
    def check(cls, knobs: dict[str, Any], pattern: Pattern) -> None:
        """Refuse knob values this method cannot use (one-line ArgumentError)."""

    @classmethod
    def workspace(cls, rows: int, cols: int, widest: int, knobs: dict[str, Any], grid: Grid | None = None) -> int:
        """Bytes the solve of one (rows x cols) linear holds beside X^T X, the solver's matrix and the weight as
        stored; `widest` is the widest input's column count."""
        chunks = 4 * min(WORKSPACE_BYTES, rows * cols * 4)  # row chunks of the masks and of the reconstruction error
        rounding = 3 * min(WORKSPACE_BYTES, rows * cols * 4) if grid else 0  # row chunks of round_to_nearest
        return (cls.solve_bytes_per_element * rows * cols + quantized_bytes(rows, cols, grid) + chunks + rounding
                + LIBRARY_WORKSPACE)

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        x = x.reshape(-1, self.columns).to(self.device, torch.float32)  # (tokens, columns)
        if self.xtx is not None:
            assert self.xtx.device == self.device, "no batch may be added once the solve has started"
            self.xtx.addmm_(x.T, x)
        elif self.sqnorms is not None:
            self.sqnorms.add_(torch.linalg.vector_norm(x, dim=0).square_())
        self.ntokens += x.shape[0]

    def all_reduce(self, ranks: Any) -> None:
        """Sum the statistics every rank added from its share of the windows (`ranks`: a `streamprune.dist.Ranks`),
        so that each rank holds those of all the windows: X^T X or the column norms, and the token count that
        normalises them, as one process would have added them (up to the order of the float32 sums)."""
        for stat in (self.xtx, self.sqnorms):
            if stat is not None:
                ranks.all_reduce_sum(stat)
        self.ntokens = ranks.sum_int(self.ntokens)

    def column_sqnorms(self) -> Tensor | None:
        """||X_j||^2 of every input column (the diagonal of X^T X), on the compute device."""
        return self.sqnorms if self.xtx is None else self.xtx.diagonal().to(self.device)

    @abstractmethod
    def prune(self, weight: Tensor, zeros: int | None = None) -> PruneResult:
        """Prune one weight (out, columns); returns the new float32 weight and its mask. `zeros` (unstructured
        only): remove exactly this many weights, instead of the method's own rounding of `sparsity` (a run whose
        blocks have their own sparsities sets each linear's count, so that the total is exact)."""

    def _park_hessian(self) -> None:
        """With `offload_hessian`, move X^T X to host memory (freeing its device buffer) until the errors."""
        if self.offload_hessian and self.xtx is not None:
            self.xtx = self.xtx.to("cpu")

    def release_solver(self) -> None:
        """Drop the solver's state once every linear of this input is pruned (before the errors)."""

    @torch.no_grad()
    def reconstruction_error(self, dense: Tensor, pruned: Tensor) -> float | None:
        """||W X - W' X||^2 / ||W X||^2 over the calibration inputs, from the accumulated X^T X, in
        chunks of rows (so the workspace stays small beside a wide X^T X); None without X^T X."""
        if self.xtx is None:
            return None
        self.release_solver()
        if self.xtx.device != self.device:  # back from host memory, now that the solver's matrix is gone
            self.xtx = self.xtx.to(self.device)
        num = den = 0.0
        chunk = rows_per_chunk(self.columns)
        for r0 in range(0, dense.shape[0], chunk):
            w = dense[r0 : r0 + chunk].to(self.device, torch.float32)
            delta = w - pruned[r0 : r0 + w.shape[0]].to(self.device, torch.float32)
            num += float(((delta @ self.xtx) * delta).sum())
            den += float(((w @ self.xtx) * w).sum())
        return num / den if den > 0 else 0.0

    @torch.no_grad()
    def split_errors(self, dense: Tensor, unrounded: Tensor, pruned: Tensor) -> tuple[float, float] | None:
        """With a grid: the sparsity error ||W X - P X||^2 / ||W X||^2 and the quantization error
        ||P X - Q X||^2 / ||W X||^2, where P is the weight just before rounding (`unrounded`) and Q the written
        one (`pruned`); from X^T X in row chunks, as `reconstruction_error` (None without X^T X)."""
        if self.xtx is None:
            return None
        self.release_solver()
        if self.xtx.device != self.device:
            self.xtx = self.xtx.to(self.device)
        sparse = quant = den = 0.0
        chunk = rows_per_chunk(self.columns)
        for r0 in range(0, dense.shape[0], chunk):
            w = dense[r0 : r0 + chunk].to(self.device, torch.float32)
            p = unrounded[r0 : r0 + w.shape[0]].to(self.device, torch.float32)
            den += float(((w @ self.xtx) * w).sum())
            delta = w - p  # never in place: `dense` may be the stored tensor itself
            sparse += float(((delta @ self.xtx) * delta).sum())
            torch.sub(p, pruned[r0 : r0 + w.shape[0]].to(self.device, torch.float32), out=delta)
            quant += float(((delta @ self.xtx) * delta).sum())
        return (sparse / den, quant / den) if den > 0 else (0.0, 0.0)

    def free(self) -> None:
        self.xtx = self.sqnorms = None


def quantized_bytes(rows: int, cols: int, grid: Grid | None) -> int:
    """What a grid adds to the solve of one linear: its uint8 codes, and a float32 scale and zero point per row and
    group (the weight just before rounding, kept for the errors, is counted with the site: Footprint.site_unrounded)."""
    if grid is None:
        return 0
    return rows * cols + 8 * rows * (cols // grid.columns(cols))


class ScorePruner(Pruner):
    """Removes the lowest-scoring weights and leaves the kept ones unchanged (Wanda, magnitude): N:M within each
    group, otherwise by the method's own unstructured rule."""

    @abstractmethod
    def score(self, w: Tensor) -> Tensor:
        """The score of each weight of the float32 matrix `w` (lower: removed first)."""

    @abstractmethod
    def unstructured_mask(self, score: Tensor, zeros: int | None = None) -> Tensor:
        """The weights to remove at `self.sparsity` (exactly `zeros` of them when given) when no N:M pattern is
        asked."""

    @torch.no_grad()
    def prune(self, weight: Tensor, zeros: int | None = None) -> PruneResult:
        w = weight.to(self.device, torch.float32, copy=True)  # filled in place below
        score = self.score(w)
        self._park_hessian()  # only the reconstruction error reads X^T X
        if self.pattern.structured:
            assert zeros is None, "an N:M pattern fixes the count"
            mask = nm_mask(score, self.pattern.n, self.pattern.m)
        else:
            mask = self.unstructured_mask(score, zeros)
        del score
        w.masked_fill_(mask, 0.0)
        if self.grid is None:
            return PruneResult(w, mask)
        unrounded = w.clone() if self.xtx is not None else None
        return PruneResult(w, mask, quant=round_to_nearest(w, mask, self.grid), unrounded=unrounded)

"""SparseGPT (Frantar & Alistarh, 2023): mask selection and OBS weight reconstruction per column block."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from streamprune.errors import ArgumentError, StreamPruneError
from streamprune.pruners.base import LIBRARY_WORKSPACE, Pruner, PruneResult
from streamprune.pruners.factor import INVERSE_BLOCK, WORKSPACE_BYTES, inverse_factor_
from streamprune.pruners.masks import Pattern, kth_smallest

logger = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10
INNER_COLUMNS = 16
DEFAULT_BLOCKSIZE = 128
# The sweep's per-column-block temporaries, in units of (rows * blocksize): errors, scales, scores and mask.
SWEEP_BYTES_PER_ELEMENT = 20


class SparseGPT(Pruner):
    """The paper's algorithm: H^-1 through its upper Cholesky factor, columns in blocks of
    `blocksize`, adaptive mask selection per block from w^2 / [chol(H^-1)]_cc^2 (N:M per row and
    group of M), OBS updates inside the block and lazy batched updates of the remaining columns."""

    knobs = ("blocksize", "damp")
    solver_matrices = 1  # the inverse factor, built in place (see factor.py)
    solve_bytes_per_element = 5  # float32 W^T and its mask

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                 offload_hessian: bool = False, errors: bool = True, blocksize: int = DEFAULT_BLOCKSIZE,
                 damp: float = 0.01) -> None:
        super().__init__(columns, device, sparsity, pattern, offload_hessian, errors)
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
    def workspace(cls, rows: int, cols: int, widest: int, knobs: dict[str, Any]) -> int:
        """The largest of: the factorization's row chunks or the blocked inversion's panels (for the widest
        input), the sweep's W^T, mask and per-block temporaries, and the errors' row chunks."""
        chunks = 4 * min(WORKSPACE_BYTES, rows * cols * 4)
        rotation = 2 * min(WORKSPACE_BYTES, widest * widest * 2)
        factorization = max(rotation, 2 * widest * min(widest, INVERSE_BLOCK) * 4)
        blocksize = knobs.get("blocksize", DEFAULT_BLOCKSIZE)
        sweep = cls.solve_bytes_per_element * rows * cols + SWEEP_BYTES_PER_ELEMENT * rows * blocksize
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
        damp = self.damp
        for attempt in range(MAX_DAMP_RETRIES + 1):
            if attempt or not self.offload_hessian:
                work.copy_(self.xtx)
            work.mul_(2.0 / self.ntokens)  # H = 2 X^T X / n
            diag = work.diagonal()
            diag[dead] = 1.0
            diag.add_(damp * diag.mean())
            if inverse_factor_(work) == 0:
                break
            logger.warning("Cholesky failed with damping %g; retrying with %g", damp, damp * 10)
            damp *= 10
        else:
            raise StreamPruneError(
                f"the Hessian is not positive definite even with damping {damp / 10:g}; "
                "the calibration activations may contain NaN or Inf"
            )
        self.damp_used, self.retries = damp, attempt
        self._hinv, self._dead = work, dead
        return work, dead

    @torch.no_grad()
    def prune(self, weight: Tensor) -> PruneResult:
        hinv, dead = self._inverse_factor()
        # Work on W^T (columns, rows): every column of W is then a contiguous row, and the per-column
        # OBS updates touch contiguous memory.
        Wt = torch.empty(weight.shape[1], weight.shape[0], device=self.device)
        Wt.copy_(weight.t())  # one float32 copy, transposed as it is made
        Wt[dead] = 0
        cols, rows = Wt.shape
        mask_t = torch.zeros(cols, rows, dtype=torch.bool, device=self.device)
        n, m = self.pattern.n, self.pattern.m
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1 = Wt[i1:i2]  # (count, rows), a contiguous view: updated in place
            Hinv1 = hinv[i1:i2, i1:i2]
            d = Hinv1.diagonal()
            Err1 = torch.zeros_like(W1)
            mask1 = mask_t[i1:i2]
            if not self.pattern.structured:
                mask1.copy_(self._block_mask(W1, d))
            scale = mask1 / d[:, None]  # err = (w - q) / d = w * mask / d, one kernel per column
            count = i2 - i1
            for j1 in range(0, count, self.inner):  # the same lazy batching again, inside the block
                j2 = min(j1 + self.inner, count)
                for i in range(j1, j2):
                    if self.pattern.structured and i % m == 0:
                        score = W1[i : i + m] ** 2 / d[i : i + m, None] ** 2  # (m, rows)
                        mask1.scatter_(0, i + score.topk(n, dim=0, largest=False).indices, True)
                        scale[i : i + m] = mask1[i : i + m] / d[i : i + m, None]
                    torch.mul(W1[i], scale[i], out=Err1[i])
                    W1[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], Err1[i], alpha=-1.0)  # OBS update, rest of sub-block
                    W1[i].masked_fill_(mask1[i], 0.0)  # q: the kept weights are unchanged by their own update
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)  # rest of the block
            Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)  # lazy update of later columns
        Wt[dead] = 0
        mask_t[dead] = True
        return PruneResult(Wt.t(), mask_t.t(), {"damp": self.damp_used, "damp_retries": self.retries})

    def _block_mask(self, W1: Tensor, d: Tensor) -> Tensor:
        """Adaptive selection over one column block (W1 is transposed: (count, rows)): the lowest
        w^2 / d^2 at the paper's threshold."""
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

"""ADMM pruning with gradual sparsity (Boža, 2024), finished by preconditioned conjugate gradients on the kept weights.

Each row w of a linear minimizes (w - w0) H (w - w0)^T (H = 2 X^T X / n, damped as for SparseGPT) subject to its
mask. The problem is solved in the column scaling that gives H a unit diagonal (w_j * sqrt(H_jj): the magnitude of a
scaled weight is Wanda's score), by ADMM on the split W = Z, Z sparse:

    W <- argmin (W - W0) H (W - W0)^T + rho ||W - Z + U||^2  =  W0 + rho (Z - U - W0) (H + rho I)^-1
    Z <- the largest entries of W + U (per row, or per N:M group), at a sparsity raised along a cubic ramp
    U <- U + W - Z

with rho fixed, so that H + rho I is factored once per input (Cholesky, shared by the linears that read it) and
each iteration is one GEMM with its inverse, or, for an input wider than the linear is tall, two triangular solves
with its factor (the inverse would cost more than it saves). Masks settle while the sparsity grows; the last iterations
keep the full sparsity. The kept weights of the final mask are then solved by conjugate gradients, batched over the
rows, each row on its own support, from the ADMM iterate: a fixed budget of steps (`pcg`), or until every row meets
the exact solve's stopping rule (`exact`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
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
from streamprune.pruners.factor import WORKSPACE_BYTES, cholesky_lower_
from streamprune.pruners.masks import Pattern, nm_mask, row_kth_smallest, row_mask, row_mask_exact
from streamprune.pruners.quant import Grid, round_to_nearest

logger = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 8
DEFAULT_RHO = 0.3
SOLVES = ("pcg", "exact")  # how the kept weights of the final mask are solved (--admm-solve)
DEFAULT_SOLVE = "pcg"
RAMP = 0.75  # the share of the iterations over which the sparsity rises to its target
PCG_STEPS = 4  # the conjugate-gradient steps of `pcg`
CG_TOLERANCE = 2e-6  # a row stops when its last STALL steps lowered its objective by less than this
STALL = 4
CG_MAX_ITERATIONS = 500  # `exact`'s cap
DEFLATED_MAX = 64  # the preconditioner's eigenpairs, at most
OVERSAMPLE = 8  # extra vectors of the subspace iteration
SUBSPACE_STEPS = 8
# Per element of the linear being pruned, at the final solve's peak: float32 W0 and the iterate, the mask, and the
# active rows' iterate, residual, float mask, direction, preconditioned residual and product, with one of them copied
# while the batch is compacted (the iterations before hold less: W0, W, U, Z - U - W0, the mask and two temporaries).
BYTES_PER_ELEMENT = 37
TINY = torch.finfo(torch.float32).tiny


class ADMM(Pruner):
    """Mask and weights found together by ADMM with a gradually increasing sparsity, then the kept weights solved
    for the final mask by preconditioned conjugate gradients. Unstructured masks keep the same count in every row;
    N:M masks keep N of every M."""

    knobs = ("damp", "admm_iterations", "admm_rho", "admm_solve")
    # the damped, unit-diagonal H (in X^T X's own buffer when it is offloaded) and (H + rho I)^-1 or its Cholesky factor
    solver_matrices = 2
    solve_bytes_per_element = BYTES_PER_ELEMENT

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                 offload_hessian: bool = False, errors: bool = True, grid: Grid | None = None,
                 damp: float = 0.01, admm_iterations: int = DEFAULT_ITERATIONS, admm_rho: float = DEFAULT_RHO,
                 admm_solve: str = DEFAULT_SOLVE) -> None:
        super().__init__(columns, device, sparsity, pattern, offload_hessian, errors, grid)
        self.damp = damp
        self.iterations = admm_iterations
        self.rho = admm_rho
        self.final = admm_solve  # how the kept weights of the final mask are solved
        self._h: Tensor | None = None  # damped H with a unit diagonal
        self._m: Tensor | None = None  # (H + rho I)^-1, or its lower Cholesky factor L (upper triangle unread)
        self._inverted = False  # whether _m is the inverse
        self._scale: Tensor | None = None  # sqrt of the damped H's diagonal: scaled weights are w * scale
        self._dead: Tensor | None = None
        self._top: tuple[Tensor, Tensor, float] | None = None  # H's largest eigenpairs and the level of the rest
        self.damp_used = damp
        self.retries = 0

    @classmethod
    def check(cls, knobs: dict[str, Any], pattern: Pattern) -> None:
        if not knobs["damp"] > 0:
            raise ArgumentError(f"damp {knobs['damp']!r} must be positive")
        if knobs["admm_iterations"] < 1:
            raise ArgumentError(f"admm-iterations {knobs['admm_iterations']!r} must be at least 1")
        if not knobs["admm_rho"] > 0:
            raise ArgumentError(f"admm-rho {knobs['admm_rho']!r} must be positive")

    @classmethod
    def workspace(cls, rows: int, cols: int, widest: int, knobs: dict[str, Any], grid: Grid | None = None) -> int:
        """The iterations' matrices of the linear, its mask scores' row chunks and the final solve's preconditioner,
        or the factorization's copy of H (for the widest input), whichever is larger."""
        chunks = 4 * min(WORKSPACE_BYTES, rows * cols * 4)
        k = deflated(cols)
        pairs = k * (k + 1) // 2
        # per-row k x k matrices and factors, V V_a, and the products of V's columns with their inner products
        preconditioner = 2 * rows * k * k * 4 + 2 * cols * k * 4 + (rows + cols) * pairs * 4
        solve = cls.solve_bytes_per_element * rows * cols + chunks + preconditioner
        if grid is not None:
            solve += quantized_bytes(rows, cols, grid) + 3 * min(WORKSPACE_BYTES, rows * cols * 4)
        return max(solve, widest * widest * 4) + LIBRARY_WORKSPACE

    @torch.no_grad()
    def _factor(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """The damped unit-diagonal H, the column scale and the dead-input mask, and in `_m` the Cholesky factor of
        H + rho I, inverted unless the input is wider than `rows` (the first linear's); once per input. A failed
        Cholesky factorization is retried with ten times the damping, as SparseGPT does."""
        if self._m is not None:
            assert self._h is not None and self._scale is not None and self._dead is not None
            return self._h, self._scale, self._dead
        assert self.xtx is not None and self.ntokens, "no calibration batch was added"
        source = self.xtx
        if self.offload_hessian:  # X^T X waits in host memory; its device buffer becomes H
            self.xtx = source.to("cpu", copy=True)
            h = source
        else:
            h = torch.empty_like(source)
        factor = torch.empty_like(h)
        dead = (self.xtx.diagonal() == 0).to(self.device)
        xtx, scales = self.xtx, []

        def attempt(damp: float, retry: int) -> bool:
            h.copy_(xtx)
            scale = damped_hessian_(h, self.ntokens, dead, damp).diagonal().sqrt()
            h.div_(scale[:, None]).div_(scale[None, :])  # the unit-diagonal scaling
            h.diagonal().fill_(1.0)
            factor.copy_(h)
            factor.diagonal().add_(self.rho)
            scales[:] = [scale]
            return bool(torch.isfinite(scale).all()) and cholesky_lower_(factor) == 0

        self.damp_used, self.retries = with_damping_retries(self.damp, attempt)
        self._inverted = h.shape[0] <= rows
        if self._inverted:
            torch.cholesky_inverse(factor, out=factor)  # factor held L (row-major view), its upper triangle unread
        self._h, self._m, self._scale, self._dead = h, factor, scales[0], dead
        self._top = top_eigenpairs(h, deflated(h.shape[0]))
        return h, scales[0], dead

    def _mask(self, v: Tensor, sparsity: float, exact: bool, zeros: int | None = None) -> Tensor:
        """The weights to remove from the scaled weights `v` at `sparsity`: the smallest |v| of each row, or for N:M
        the smallest of the N lowest of each group of M (all of them at the target sparsity). Unless `exact`, a row
        may lose more than its share where scores tie with its threshold (a faster selection, for the iterations
        whose mask is not final). `zeros` (the final mask of a linear given its exact count): that many, spread over
        the rows as `row_mask_exact` does."""
        score = v.abs()
        if self.pattern.structured:
            candidates = nm_mask(score, self.pattern.n, self.pattern.m)
            if sparsity >= self.sparsity:
                return candidates
            score.masked_fill_(~candidates, math.inf)
        if exact:
            return row_mask(score, sparsity) if zeros is None else row_mask_exact(score, zeros)
        k = math.ceil(sparsity * score.shape[1] - 1e-9)
        if not k:
            return torch.zeros_like(score, dtype=torch.bool)
        return score <= row_kth_smallest(score, k)

    def _schedule(self, t: int) -> float:
        """The sparsity at iteration t (0-based): a cubic ramp reaching the target after RAMP of the iterations."""
        ramp = max(1, round(RAMP * self.iterations))
        if t + 1 >= ramp:
            return self.sparsity
        return self.sparsity * (1.0 - (1.0 - (t + 1) / ramp) ** 3)

    @torch.no_grad()
    def prune(self, weight: Tensor, zeros: int | None = None) -> PruneResult:
        h, scale, dead = self._factor(weight.shape[0])
        w0, x, mask = self._search(weight, scale, dead, zeros)
        limit = CG_MAX_ITERATIONS if self.final == "exact" else PCG_STEPS
        cg_iterations, residual = self._solve_kept(x, w0, h, mask, limit)
        x.div_(scale)
        info = {"damp": self.damp_used, "damp_retries": self.retries, "iterations": self.iterations,
                "cg_iterations": cg_iterations, "residual": residual}
        if self.grid is None:
            return PruneResult(x, mask, info)
        unrounded = x.clone() if self.xtx is not None else None
        return PruneResult(x, mask, info, quant=round_to_nearest(x, mask, self.grid), unrounded=unrounded)

    def _search(self, weight: Tensor, scale: Tensor, dead: Tensor, zeros: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """The ADMM iterations on the scaled weight: the scaled W0, the last W with the final mask's weights set to
        0 (the final solve's start) and the final mask."""
        w0 = weight.to(self.device, torch.float32, copy=True)
        w0.mul_(scale)  # scaled weights: the objective is (w - w0) h (w - w0)^T
        w0[:, dead] = 0
        u = torch.zeros_like(w0)  # the scaled dual U
        t = torch.zeros_like(w0)  # Z - U - W0
        w = w0.clone()  # the first W-update, from Z = W0 and U = 0
        mask = torch.zeros_like(w0, dtype=torch.bool)
        if self.sparsity > 0 or zeros:
            for i in range(self.iterations):
                if i:
                    self._update(t, w0, w)
                u.add_(w)  # V = W + U
                last = i == self.iterations - 1
                mask = self._mask(u, self._schedule(i), exact=last, zeros=zeros if last else None)
                torch.where(mask, u.neg(), u, out=t).sub_(w0)  # Z - U - W0 with Z = V where kept, U = V elsewhere
                u.masked_fill_(~mask, 0.0)
        del u, t
        mask[:, dead] = True
        return w0, w.masked_fill_(mask, 0.0), mask

    def _update(self, t: Tensor, w0: Tensor, w: Tensor) -> None:
        """W = W0 + rho T (H + rho I)^-1, into `w`: one GEMM with the inverse, or two triangular solves with L L^T,
        from the right."""
        assert self._m is not None
        if self._inverted:
            torch.addmm(w0, t, self._m, alpha=self.rho, out=w)
            return
        y = torch.linalg.solve_triangular(self._m.mT, t, upper=True, left=False)  # T L^-T
        torch.linalg.solve_triangular(self._m, y, upper=False, left=False, out=w)
        w.mul_(self.rho).add_(w0)

    def _solve_kept(self, x: Tensor, w0: Tensor, h: Tensor, mask: Tensor, limit: int,
              precondition: Callable[[Tensor], Any] | None = None) -> tuple[int, float]:
        """Solve in place, row by row on its kept support, min (x - w0) h (x - w0)^T, by preconditioned conjugate
        gradients batched over the rows (x: the warm start, 0 off the support), at most `limit` steps. Each step
        lowers a row's objective f by alpha (r.z); a row stops once its last STALL steps lowered f by less than
        CG_TOLERANCE f in all (CG's own estimate of the gap to the optimum), or its residual vanishes. A stopped row
        stays in the batch, frozen, until a quarter of the batch has stopped; then the batch is compacted. Returns
        the steps taken and the largest decrease of a row's f in its last step, relative to f (0 for a row whose
        residual vanished): about what one more step would still gain. `precondition(keep)`: the preconditioner of
        the rows with float supports `keep` (default: `Deflation` by H's largest eigenpairs)."""
        top = self._top
        assert top is not None
        e = torch.sub(w0, x)
        r = e @ h  # the residual (W0 - X) H, on the support below
        f = dot(r, e)  # the objective of each row at the warm start
        del e
        r.masked_fill_(mask, 0.0)
        idx = torch.nonzero(dot(r, r) > TINY * f.clamp_min(TINY)).squeeze(1)  # rows not at their optimum
        keep = mask[idx].logical_not_().to(torch.float32)
        pre = Deflation(*top, keep) if precondition is None else precondition(keep)
        state = _Batch(x, r[idx], f[idx], keep, idx, h, pre)
        del r, f
        gain = 0.0
        it = 0
        while state.idx.numel() and it < limit:
            it += 1
            gain = max(gain, state.step(it, x))
            if not bool(state.live.any()):
                break
        state.store(x)
        if bool(state.live.any()):  # stopped by the step budget
            gain = max(gain, float(state.gain[state.live].max()))
            if limit == CG_MAX_ITERATIONS:
                logger.warning("exact solve: %d rows stopped at %d conjugate-gradient steps, estimated gap %.3g",
                               int(state.live.sum()), it, float(state.estimate()[state.live].max()))
        return it, gain

    def release_solver(self) -> None:
        self._m = self._h = self._top = None

    def free(self) -> None:
        super().free()
        self._m = self._h = self._scale = self._dead = self._top = None


class _Batch:
    """The rows of one final solve still in its batch: iterate, residual, objective, float support (multiplying by
    a bool mask is several x slower), direction, preconditioned residual and the last STALL decreases of f; a row
    that stops is frozen (alpha 0) and leaves at the next compaction."""

    def __init__(self, x: Tensor, r: Tensor, f: Tensor, keep: Tensor, idx: Tensor, h: Tensor, pre: Any) -> None:
        self.h, self.idx, self.x, self.r, self.f, self.keep, self.pre = h, idx, x[idx], r, f, keep, pre
        self.z = self.pre.apply(r, keep)
        self.rz = dot(r, self.z)
        self.p = self.z
        self.recent = torch.zeros(STALL, idx.numel(), device=x.device)
        self.gain = torch.zeros(idx.numel(), device=x.device)  # the last step's decrease of f, relative to f
        self.live = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)

    def estimate(self) -> Tensor:
        """CG's estimate of each row's gap to its optimum, relative to its objective: the last STALL decreases."""
        return self.recent.sum(0) / self.f.clamp_min(TINY)

    def step(self, it: int, x: Tensor) -> float:
        """One conjugate-gradient step of every live row; returns the largest relative gain of the rows it stops."""
        ap = (self.p @ self.h).mul_(self.keep)
        alpha = torch.where(self.live, self.rz / dot(self.p, ap).clamp_min_(TINY), 0.0)  # frozen rows do not move
        self.x.addcmul_(alpha[:, None], self.p)
        self.r.addcmul_(alpha[:, None], ap, value=-1.0)
        del ap
        decrease = alpha * self.rz
        self.f.sub_(decrease)
        self.recent[it % STALL] = decrease
        self.gain = decrease / self.f.clamp_min(TINY)
        self.z = self.pre.apply(self.r, self.keep)
        rz_new = dot(self.r, self.z)
        estimate = self.estimate()
        solved = rz_new <= TINY * self.f.clamp_min(TINY)
        going = ((estimate > CG_TOLERANCE) | (it < STALL)) & ~solved
        stopped = self.live & ~going
        gain = 0.0
        if bool(stopped.any()):
            gain = float(self.gain.masked_fill(solved, 0.0)[stopped].max())
            self.live &= going
            if not bool(self.live.any()):
                return gain
            if 4 * int(self.live.sum()) <= 3 * self.live.numel():  # a quarter frozen: compact
                rz_new = self.compact(x, rz_new)
        # frozen rows: p = z, finite
        self.p.mul_(torch.where(self.live, rz_new / self.rz.clamp_min(TINY), 0.0)[:, None]).add_(self.z)
        self.rz = rz_new
        return gain

    def compact(self, x: Tensor, rz_new: Tensor) -> Tensor:
        """Store the frozen rows' iterates in `x` and drop them, one array at a time; returns the live rz_new."""
        live = self.live
        x[self.idx[~live]] = self.x[~live]
        self.x = self.x[live]
        self.r = self.r[live]
        self.keep = self.keep[live]
        self.p = self.p[live]
        self.z = self.z[live]
        self.idx, self.f, self.rz, self.gain = self.idx[live], self.f[live], self.rz[live], self.gain[live]
        self.recent = self.recent[:, live]
        self.pre.select(live)
        self.live = live[live]
        return rz_new[live]

    def store(self, x: Tensor) -> None:
        x[self.idx] = self.x


def dot(a: Tensor, b: Tensor) -> Tensor:
    """The row-wise dot products of a and b, without an a * b temporary (einsum runs them as a batched GEMM)."""
    return torch.einsum("ij,ij->i", a, b)


def deflated(columns: int) -> int:
    """How many of H's largest eigenpairs the final solve's preconditioner takes: a quarter of the columns, at most
    DEFLATED_MAX (its per-row setup costs rows x columns x k^2 / 2, k^2 / 4 columns GEMMs with H)."""
    return max(1, min(DEFLATED_MAX, columns // 4, columns - 1))


def top_eigenpairs(h: Tensor, k: int) -> tuple[Tensor, Tensor, float]:
    """The k largest eigenvalues of the symmetric h (unit diagonal) and their eigenvectors (columns, k), by subspace
    iteration from a fixed start (deterministic), and sigma, the level the other eigenvalues are taken at (the next
    Ritz value). Only the preconditioner reads them: an inexact pair slows the solve, it does not change its result."""
    n = h.shape[0]
    width = min(n, k + 1 + OVERSAMPLE)
    g = torch.Generator(device=h.device).manual_seed(0)
    y = torch.randn(n, width, generator=g, device=h.device)
    for _ in range(SUBSPACE_STEPS):
        y = torch.linalg.qr(h @ y).Q
    values, vectors = torch.linalg.eigh(y.T @ h @ y)  # Rayleigh-Ritz, ascending
    values, vectors = values.flip(0), (y @ vectors).flip(1)
    return values[:k].clamp_min(0.0), vectors[:, :k].contiguous(), float(values[k].clamp_min(1e-6))


class Deflation:
    """The preconditioner of the rows' masked systems: with H ~ sigma I + V D V^T (V: H's k largest eigenvectors,
    D = their eigenvalues - sigma), each row's kept block H_SS ~ sigma I + V_S D V_S^T, inverted exactly by
    Woodbury: (I - V_S (sigma D^-1 + V_S^T V_S)^-1 V_S^T) / sigma, with one k x k Cholesky factor per row."""

    def __init__(self, values: Tensor, vectors: Tensor, sigma: float, keep: Tensor) -> None:
        self.v, self.sigma = vectors, sigma
        k = vectors.shape[1]
        a, b = torch.triu_indices(k, k, device=vectors.device)
        inner = torch.empty(keep.shape[0], k, k, device=vectors.device)
        upper = keep @ (vectors[:, a] * vectors[:, b])  # V_S^T V_S of every row: its upper triangle, one GEMM
        inner[:, a, b] = upper
        inner[:, b, a] = upper
        del upper
        inner.diagonal(dim1=1, dim2=2).add_(sigma / (values - sigma).clamp_min(1e-6 * sigma))
        self.factor = torch.linalg.cholesky_ex(inner).L
        self.factor[~torch.isfinite(self.factor).all(2).all(1)] = 0.0  # never: the matrices are SPD by construction

    def apply(self, r: Tensor, keep: Tensor) -> Tensor:
        """M^-1 r for rows r (zero off their supports)."""
        y = torch.cholesky_solve((r @ self.v)[:, :, None], self.factor)[:, :, 0]
        return torch.addmm(r, y, self.v.T, alpha=-1.0).mul_(keep).div_(self.sigma)  # keep: float, 0 or 1

    def select(self, rows: Tensor) -> None:
        self.factor = self.factor[rows]

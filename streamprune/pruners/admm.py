"""ADMM pruning with gradual sparsity (Boža, 2024), finished by an exact solve of the kept weights (as ALPS).

Each row w of a linear minimizes (w - w0) H (w - w0)^T (H = 2 X^T X / n, damped as for SparseGPT) subject to its
mask. The problem is solved in the column scaling that gives H a unit diagonal (w_j * sqrt(H_jj): the magnitude of a
scaled weight is Wanda's score), by ADMM on the split W = Z, Z sparse:

    W <- argmin (W - W0) H (W - W0)^T + rho ||W - Z + U||^2  =  W0 + rho (Z - U - W0) (H + rho I)^-1
    Z <- the largest entries of W + U (per row, or per N:M group), at a sparsity raised along a cubic ramp
    U <- U + W - Z

so that each iteration is one GEMM with (H + rho I)^-1, factored once per input and shared by the linears that read
it. Masks settle while the sparsity grows; the last iterations keep the full sparsity. The kept weights of the final
mask are then solved exactly (to float32 precision) by conjugate gradients, batched over the rows, each row on its own
support, warm-started from the ADMM iterate: rows leave the batch as they converge.
"""

from __future__ import annotations

import logging
import math
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
from streamprune.pruners.masks import Pattern, nm_mask, row_mask, row_mask_exact
from streamprune.pruners.quant import Grid, round_to_nearest

logger = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 8
DEFAULT_RHO = 0.3
RAMP = 0.75  # the share of the iterations over which the sparsity rises to its target
CG_TOLERANCE = 2e-6  # a row's exact solve stops when its last STALL steps lowered its objective by less than this
STALL = 4
CG_MAX_ITERATIONS = 500
DEFLATED_MAX = 64  # the preconditioner's eigenpairs, at most
OVERSAMPLE = 8  # extra vectors of the subspace iteration
SUBSPACE_STEPS = 8
# Per element of the linear being pruned, at the exact solve's peak: float32 W0 and the iterate, the mask, and the
# active rows' iterate, residual, float mask, direction, preconditioned residual and product, with one of them copied
# while the batch is compacted (the iterations before hold less: W0, W, U, Z - U - W0, the mask and two temporaries).
BYTES_PER_ELEMENT = 37


class ADMM(Pruner):
    """Mask and weights found together by ADMM with a gradually increasing sparsity, then the kept weights solved
    exactly for the final mask. Unstructured masks keep the same count in every row; N:M masks keep N of every M."""

    knobs = ("damp", "admm_iterations", "admm_rho")
    # the damped, unit-diagonal H (in X^T X's own buffer when it is offloaded) and (H + rho I)^-1
    solver_matrices = 2
    solve_bytes_per_element = BYTES_PER_ELEMENT

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                 offload_hessian: bool = False, errors: bool = True, grid: Grid | None = None,
                 damp: float = 0.01, admm_iterations: int = DEFAULT_ITERATIONS, admm_rho: float = DEFAULT_RHO) -> None:
        super().__init__(columns, device, sparsity, pattern, offload_hessian, errors, grid)
        self.damp = damp
        self.iterations = admm_iterations
        self.rho = admm_rho
        self._h: Tensor | None = None  # damped H with a unit diagonal
        self._p: Tensor | None = None  # (H + rho I)^-1
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
        """The iterations' matrices of the linear, its mask scores' row chunks and the exact solve's preconditioner,
        or the inversion's copy of the factor (for the widest input), whichever is larger."""
        chunks = 4 * min(WORKSPACE_BYTES, rows * cols * 4)
        k = deflated(cols)
        preconditioner = 2 * rows * k * k * 4 + 2 * cols * k * 4  # per-row k x k matrices and factors; V V_a
        solve = cls.solve_bytes_per_element * rows * cols + chunks + preconditioner
        if grid is not None:
            solve += quantized_bytes(rows, cols, grid) + 3 * min(WORKSPACE_BYTES, rows * cols * 4)
        return max(solve, widest * widest * 4) + LIBRARY_WORKSPACE

    @torch.no_grad()
    def _factor(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The damped unit-diagonal H, (H + rho I)^-1, the column scale and the dead-input mask; once per input.
        A failed Cholesky factorization is retried with ten times the damping, as SparseGPT does."""
        if self._p is not None:
            assert self._h is not None and self._scale is not None and self._dead is not None
            return self._h, self._p, self._scale, self._dead
        assert self.xtx is not None and self.ntokens, "no calibration batch was added"
        source = self.xtx
        if self.offload_hessian:  # X^T X waits in host memory; its device buffer becomes H
            self.xtx = source.to("cpu", copy=True)
            h = source
        else:
            h = torch.empty_like(source)
        p = torch.empty_like(h)
        dead = (self.xtx.diagonal() == 0).to(self.device)
        xtx, scales = self.xtx, []

        def factor(damp: float, attempt: int) -> bool:
            h.copy_(xtx)
            scale = damped_hessian_(h, self.ntokens, dead, damp).diagonal().sqrt()
            h.div_(scale[:, None]).div_(scale[None, :])  # the unit-diagonal scaling
            h.diagonal().fill_(1.0)
            p.copy_(h)
            p.diagonal().add_(self.rho)
            scales[:] = [scale]
            return bool(torch.isfinite(scale).all()) and cholesky_lower_(p) == 0

        damp, attempt = with_damping_retries(self.damp, factor)
        scale = scales[0]
        torch.cholesky_inverse(p, out=p)  # p held the lower factor L of H + rho I (row-major view: L)
        self.damp_used, self.retries = damp, attempt
        self._h, self._p, self._scale, self._dead = h, p, scale, dead
        self._top = top_eigenpairs(h, deflated(h.shape[0]))
        return h, p, scale, dead

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
        return score <= score.kthvalue(k, dim=1, keepdim=True).values

    def _schedule(self, t: int) -> float:
        """The sparsity at iteration t (0-based): a cubic ramp reaching the target after RAMP of the iterations."""
        ramp = max(1, round(RAMP * self.iterations))
        if t + 1 >= ramp:
            return self.sparsity
        return self.sparsity * (1.0 - (1.0 - (t + 1) / ramp) ** 3)

    @torch.no_grad()
    def prune(self, weight: Tensor, zeros: int | None = None) -> PruneResult:
        h, p, scale, dead = self._factor()
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
                    torch.addmm(w0, t, p, alpha=self.rho, out=w)  # W = W0 + rho (Z - U - W0) P
                u.add_(w)  # V = W + U
                last = i == self.iterations - 1
                mask = self._mask(u, self._schedule(i), exact=last, zeros=zeros if last else None)
                torch.where(mask, u.neg(), u, out=t).sub_(w0)  # Z - U - W0 with Z = V where kept, U = V elsewhere
                u.masked_fill_(~mask, 0.0)
        del u, t
        mask[:, dead] = True
        x = w.masked_fill_(mask, 0.0)  # warm start: the last W on the final mask
        cg_iterations, residual = self._exact(x, w0, h, mask)
        x.div_(scale)
        info = {"damp": self.damp_used, "damp_retries": self.retries, "iterations": self.iterations,
                "cg_iterations": cg_iterations, "residual": residual}
        if self.grid is None:
            return PruneResult(x, mask, info)
        unrounded = x.clone() if self.xtx is not None else None
        return PruneResult(x, mask, info, quant=round_to_nearest(x, mask, self.grid), unrounded=unrounded)

    def _exact(self, x: Tensor, w0: Tensor, h: Tensor, mask: Tensor) -> tuple[int, float]:
        """Solve in place, row by row on its kept support, min (x - w0) h (x - w0)^T, by preconditioned conjugate
        gradients batched over the rows (x: the warm start, 0 off the support). Each step lowers a row's objective f
        by alpha (r.z); a row stops once its last STALL steps lowered f by less than CG_TOLERANCE f in all (CG's own
        estimate of the gap to the optimum), or its residual vanishes. A stopped row stays in the batch, frozen,
        until a quarter of the batch has stopped; then the batch is compacted. Returns the iterations and the largest
        estimated gap relative to f."""
        assert self._top is not None
        e = torch.sub(w0, x)
        r = e @ h  # the residual (W0 - X) H, on the support below
        f = dot(r, e)  # the objective of each row at the warm start
        del e
        r.masked_fill_(mask, 0.0)
        tiny = torch.finfo(torch.float32).tiny
        idx = torch.nonzero(dot(r, r) > tiny * f.clamp_min(tiny)).squeeze(1)  # rows not at their optimum
        x_a, r_a, f_a = x[idx], r[idx], f[idx]
        del r, f
        keep_a = mask[idx].logical_not_().to(torch.float32)  # float: multiplying by a bool mask is several x slower
        pre = Deflation(*self._top, keep_a)
        z_a = pre.apply(r_a, keep_a)
        rz_a = dot(r_a, z_a)
        p_a = z_a
        recent = torch.zeros(STALL, idx.numel(), device=x.device)  # the last STALL decreases of f
        live = torch.ones(idx.numel(), dtype=torch.bool, device=x.device)
        gap = 0.0
        it = 0
        while idx.numel() and it < CG_MAX_ITERATIONS:
            it += 1
            ap = (p_a @ h).mul_(keep_a)
            alpha = torch.where(live, rz_a / dot(p_a, ap).clamp_min_(tiny), 0.0)  # frozen rows do not move
            x_a.addcmul_(alpha[:, None], p_a)
            r_a.addcmul_(alpha[:, None], ap, value=-1.0)
            del ap
            decrease = alpha * rz_a
            f_a.sub_(decrease)
            recent[it % STALL] = decrease
            z_a = pre.apply(r_a, keep_a)
            rz_new = dot(r_a, z_a)
            estimate = recent.sum(0) / f_a.clamp_min(tiny)
            going = (estimate > CG_TOLERANCE) | (it < STALL)
            going &= rz_new > tiny * f_a.clamp_min(tiny)
            stopped = live & ~going
            if bool(stopped.any()):
                gap = max(gap, float(estimate[stopped].max()))
                live &= going
                if not bool(live.any()):
                    break
                if 4 * int(live.sum()) <= 3 * live.numel():  # a quarter frozen: compact, one array at a time
                    x[idx[~live]] = x_a[~live]
                    x_a = x_a[live]
                    r_a = r_a[live]
                    keep_a = keep_a[live]
                    p_a = p_a[live]
                    z_a = z_a[live]
                    idx, f_a, rz_a, rz_new, recent = idx[live], f_a[live], rz_a[live], rz_new[live], recent[:, live]
                    pre.select(live)
                    live = live[live]
            p_a.mul_(torch.where(live, rz_new / rz_a.clamp_min(tiny), 0.0)[:, None]).add_(z_a)  # frozen: p = z, finite
            rz_a = rz_new
        x[idx] = x_a
        if bool(live.any()) and it >= CG_MAX_ITERATIONS:  # the iteration cap: what was reached
            gap = max(gap, float((recent.sum(0) / f_a.clamp_min(tiny))[live].max()))
            logger.warning("exact solve: %d rows stopped at %d conjugate-gradient steps, estimated gap %.3g",
                           int(live.sum()), it, gap)
        return it, gap

    def release_solver(self) -> None:
        self._p = self._h = self._top = None

    def free(self) -> None:
        super().free()
        self._p = self._h = self._scale = self._dead = self._top = None


def dot(a: Tensor, b: Tensor) -> Tensor:
    """The row-wise dot products of a and b, without an a * b temporary (einsum runs them as a batched GEMM)."""
    return torch.einsum("ij,ij->i", a, b)


def deflated(columns: int) -> int:
    """How many of H's largest eigenpairs the exact solve's preconditioner takes: a quarter of the columns, at most
    DEFLATED_MAX (its per-row setup costs rows x columns x k^2, k^2 / columns GEMMs with H)."""
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
        inner = torch.empty(keep.shape[0], k, k, device=vectors.device)
        kept = keep.to(torch.float32)
        for a in range(k):  # V_S^T V_S of every row at once: row a of each k x k block
            torch.matmul(kept, vectors * vectors[:, a : a + 1], out=inner[:, a])
        inner.diagonal(dim1=1, dim2=2).add_(sigma / (values - sigma).clamp_min(1e-6 * sigma))
        self.factor = torch.linalg.cholesky_ex(inner).L
        self.factor[~torch.isfinite(self.factor).all(2).all(1)] = 0.0  # never: the matrices are SPD by construction

    def apply(self, r: Tensor, keep: Tensor) -> Tensor:
        """M^-1 r for rows r (zero off their supports)."""
        y = torch.cholesky_solve((r @ self.v)[:, :, None], self.factor)[:, :, 0]
        return torch.addmm(r, y, self.v.T, alpha=-1.0).mul_(keep).div_(self.sigma)  # keep: float, 0 or 1

    def select(self, rows: Tensor) -> None:
        self.factor = self.factor[rows]

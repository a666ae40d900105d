"""The upper Cholesky factor of H^-1, computed inside H's own buffer.

SparseGPT needs U, upper triangular with H^-1 = U^T U. With J the reversal permutation:
J H J = L L^T (L lower)  =>  H = R R^T with R = J L J upper  =>  H^-1 = (R^-1)^T R^-1, so
U = R^-1 = J L^-1 J. Every step below works in place on one d x d float32 buffer with workspace of a
few rows, so a 49152-wide Hessian (9.7 GB) needs 9.7 GB, not the two or three copies that
`cholesky`, `solve_triangular` and `flip` would each allocate.
"""

from __future__ import annotations

import torch
from torch import Tensor

WORKSPACE_BYTES = 16 * 2**20  # rows moved (or scored) at once by the in-place and chunked steps
INVERSE_BLOCK = 512  # diagonal block of the blocked triangular inversion


def rows_per_chunk(width: int, itemsize: int = 4) -> int:
    return max(1, WORKSPACE_BYTES // (width * itemsize))


def rotate_half_turn_(A: Tensor) -> Tensor:
    """A <- J A J (entry (i, j) moves to (d-1-i, d-1-j)), swapping row chunks from both ends."""
    d = A.shape[0]
    chunk = rows_per_chunk(d)
    half = d // 2
    for a0 in range(0, half, chunk):
        a1 = min(a0 + chunk, half)
        top = A[a0:a1].flip(0, 1)  # a copy of at most `chunk` rows
        A[a0:a1] = A[d - a1 : d - a0].flip(0, 1)
        A[d - a1 : d - a0] = top
    if d % 2:
        A[half] = A[half].flip(0)
    return A


def cholesky_lower_(A: Tensor) -> int:
    """A (symmetric, row-major) <- its lower Cholesky factor L, in place; returns LAPACK's info (0: success).

    LAPACK and cuSOLVER factor column-major matrices in place; A's transpose is column-major and,
    A being symmetric, equal to A, so its upper factor written there is L in A's row-major view.
    """
    info = torch.empty((), dtype=torch.int32, device=A.device)
    torch.linalg.cholesky_ex(A.mT, upper=True, out=(A.mT, info))
    return int(info)


def invert_lower_(L: Tensor, block: int = INVERSE_BLOCK) -> Tensor:
    """L (lower triangular, zeros above the diagonal) <- L^-1, in place, by diagonal blocks from the
    last to the first (LAPACK's trtri): with L = [[A, 0], [B, C]] and C already inverted,
    B <- -C^-1 B A^-1 and A <- A^-1. Workspace: (d x block) floats."""
    d = L.shape[0]
    for j in range(((d - 1) // block) * block, -1, -block):
        e = min(j + block, d)
        A = L[j:e, j:e]
        if e < d:
            B = L[e:, j:e]
            T = L[e:, e:] @ B  # C^-1 B; C^-1's upper triangle is zero
            B.copy_(torch.linalg.solve_triangular(A, T, upper=False, left=False).neg_())  # -C^-1 B A^-1
        eye = torch.eye(e - j, dtype=L.dtype, device=L.device)
        A.copy_(torch.linalg.solve_triangular(A, eye, upper=False))
    return L


def inverse_factor_(H: Tensor) -> int:
    """H (symmetric positive definite) <- the upper Cholesky factor of H^-1, in place.

    Returns 0 on success, else the failing Cholesky's info; H is then overwritten and must be restored.
    """
    rotate_half_turn_(H)
    info = cholesky_lower_(H)
    if info:
        return info
    invert_lower_(H)
    rotate_half_turn_(H)
    return 0

"""Float64 re-derivations of SparseGPT and Wanda, written from the papers, independent of streamprune.

Nothing here imports streamprune. SparseGPT is swept column by column with the inverse of each
remaining sub-Hessian (OBS), solved for directly rather than through a Cholesky factor of H^-1.
Masks are chosen where the paper's code chooses them: the unstructured one at each column block's
start, the N:M one at each group's first column, both from the weights as updated so far.

Each function can *follow* a given mask: it still records the mask it would choose from its own
state (`chosen`), but applies the followed one, so that one near-tie decided the other way by float
noise does not change everything after it. `gap` says how far each weight's score is from its
region's decision boundary, so that a test can require every disagreement to be a near-tie. Exact
ties (the zero scores of inputs a ReLU never opens, say) go the followed mask's way: any choice
among them is right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Selection:
    weight: Tensor  # float64 pruned (for SparseGPT, updated) weight, with `mask` applied
    mask: Tensor  # the mask applied: the followed one, else `chosen`; True where a weight is removed
    chosen: Tensor  # the mask chosen from the reference's own state at each selection point
    gap: Tensor  # relative distance of each weight's score from its region's boundary (float64)

    def flips(self) -> tuple[int, float]:
        """How many weights `chosen` and `mask` disagree on, and the largest relative gap among them."""
        differ = self.chosen != self.mask
        return int(differ.sum()), float(self.gap[differ].max()) if differ.any() else 0.0


def hessian(x: Tensor) -> Tensor:
    """H = 2 X^T X / n over the n rows (tokens) of x, in float64."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2 * x.T @ x / x.shape[0]


def lowest(score: Tensor, count: int, prefer: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The `count` lowest scores of each row of `score`, exact ties broken in favour of `prefer`
    (then of the lower index), and each score's relative distance from its row's boundary: a chosen
    score's from the lowest unchosen one, an unchosen score's from the highest chosen one."""
    if count == 0:
        return torch.zeros_like(score, dtype=torch.bool), torch.full_like(score, math.inf)
    order = torch.arange(score.shape[-1]).expand_as(score)
    if prefer is not None:  # two stable sorts: by score, and among equal scores the preferred first
        order = (~prefer).to(torch.uint8).sort(dim=-1, stable=True).indices
    order = order.gather(-1, score.gather(-1, order).sort(dim=-1, stable=True).indices)
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order[..., :count], True)
    s = score.gather(-1, order)
    low = s[..., count - 1 : count]  # the highest chosen score of each row
    high = s[..., count : count + 1] if count < s.shape[-1] else torch.full_like(low, math.inf)
    tiny = torch.finfo(score.dtype).tiny
    gap = torch.where(chosen, (high - score) / high.clamp_min(tiny), (score - low) / score.clamp_min(tiny))
    return chosen, gap


def nm_lowest(score: Tensor, n: int, m: int, prefer: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`lowest` within every group of m consecutive columns of each row."""
    rows, cols = score.shape
    groups = (rows, cols // m, m)
    chosen, gap = lowest(score.reshape(groups), n, None if prefer is None else prefer.reshape(groups))
    return chosen.reshape(rows, cols), gap.reshape(rows, cols)


def sparsegpt(weight: Tensor, H: Tensor, sparsity: float = 0.5, blocksize: int = 128, nm: tuple[int, int] | None = None,
              damp: float = 0.01, follow: Tensor | None = None) -> Selection:
    """SparseGPT in float64 from the Hessian H = 2 X^T X / n of the layer's inputs.

    Dead inputs (zero diagonal) get 1 on the diagonal and their weight columns zeroed, then the
    damping `damp * mean(diag H)` is added, as the paper's code does. The saliency of weight (r, i)
    is w^2 / [H_F^-1]_00 over the remaining columns F = {i, i+1, ...}. Unstructured: at each block
    start, over the whole block, the paper's threshold sort(score)[int(numel * sparsity)] with
    score <= threshold removed. N:M (`nm`): the n lowest of each row's group of m, at the group's
    first column. Then column i's removed weights are zeroed and the error spread over the
    remaining columns with row 0 of [H_F^-1].
    """
    W = weight.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    # row 0 of [H_F^-1] for F = {i, i+1, ...}: H_F z = e_0 solved directly (z is column 0, = row 0 by symmetry)
    inv_rows = [torch.linalg.solve(H[i:, i:], torch.eye(cols - i, 1, dtype=torch.float64))[:, 0] for i in range(cols)]
    d = torch.stack([r[0] for r in inv_rows])  # [H_F^-1]_00
    chosen = torch.zeros(rows, cols, dtype=torch.bool)
    gap = torch.zeros(rows, cols, dtype=torch.float64)
    applied = chosen if follow is None else follow.to(torch.bool)

    def prefer(i1: int, i2: int) -> Tensor | None:  # exact ties go the followed mask's way
        return None if follow is None else applied[:, i1:i2].reshape(1 if nm is None else rows, -1)

    for i in range(cols):
        if nm is None and i % blocksize == 0:
            i2 = min(i + blocksize, cols)
            score = W[:, i:i2] ** 2 / d[i:i2]  # (rows, count)
            k = int(score.numel() * sparsity)
            if k < score.numel():  # the paper removes score <= sort(score)[k]: k + 1 weights, and exact ties
                flat = score.reshape(1, -1)
                c, g = lowest(flat, int((flat <= flat.sort().values[0, k]).sum()), prefer(i, i2))
                chosen[:, i:i2], gap[:, i:i2] = c.view_as(score), g.view_as(score)
        elif nm is not None and i % nm[1] == 0:
            i2 = i + nm[1]
            score = W[:, i:i2] ** 2 / d[i:i2]  # (rows, m)
            chosen[:, i:i2], gap[:, i:i2] = lowest(score, nm[0], prefer(i, i2))
        q = W[:, i].masked_fill(applied[:, i], 0.0)
        W[:, i:] -= torch.outer((W[:, i] - q) / d[i], inv_rows[i])  # OBS: removes column i's error optimally
        W[:, i] = q
    W[:, dead] = 0.0
    chosen[:, dead] = True  # removed whatever the scores said, as their weights are zeroed
    gap[:, dead] = math.inf
    return Selection(W, applied.clone(), chosen, gap)


def wanda(weight: Tensor, x: Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
          follow: Tensor | None = None) -> Selection:
    """Wanda in float64: score |W_ij| * ||X_j||_2 over the inputs x (tokens, columns); the
    ceil(sparsity * columns) lowest of each row removed, or the n lowest of each row's group of m."""
    W = weight.double()
    x = x.reshape(-1, x.shape[-1]).double()
    score = W.abs() * x.norm(dim=0)[None, :]
    prefer = None if follow is None else follow.to(torch.bool)
    if nm is not None:
        chosen, gap = nm_lowest(score, *nm, prefer)
    else:
        chosen, gap = lowest(score, math.ceil(sparsity * W.shape[1] - 1e-9), prefer)
    applied = chosen if prefer is None else prefer
    return Selection(W.masked_fill(applied, 0.0), applied.clone(), chosen, gap)

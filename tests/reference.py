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
    # with a grid: the codes applied (the followed ones, else `chosen_codes`), the codes the reference rounds to from
    # its own state, how far each kept weight w / scale is from a rounding tie (|frac - 0.5|), the grid
    codes: Tensor | None = None
    chosen_codes: Tensor | None = None
    code_gap: Tensor | None = None
    scale: Tensor | None = None  # (rows, groups)
    zero: Tensor | None = None

    def flips(self) -> tuple[int, float]:
        """How many weights `chosen` and `mask` disagree on, and the largest relative gap among them. With a grid,
        a weight the mask removes but the reference keeps and rounds to 0 is no disagreement (the same value and
        the same error either way): a mask read back from a written weight's zeros holds such weights."""
        differ = self.chosen != self.mask
        if self.chosen_codes is not None:
            assert self.zero is not None
            differ &= ~(self.mask & (self.chosen_codes == self.zero.repeat_interleave(
                self.mask.shape[1] // self.zero.shape[1], 1)))
        return int(differ.sum()), float(self.gap[differ].max()) if differ.any() else 0.0

    def code_flips(self) -> tuple[int, float]:
        """How many kept weights' codes differ from the reference's own rounding, and the largest distance from a
        rounding tie among them (a tie broken by float noise is near 0)."""
        assert self.codes is not None and self.chosen_codes is not None and self.code_gap is not None
        differ = (self.codes != self.chosen_codes) & ~self.mask
        return int(differ.sum()), float(self.code_gap[differ].max()) if differ.any() else 0.0


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


def grid_params(lo: Tensor, hi: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of a uniform grid over [lo, hi] (lo <= 0 <= hi): asymmetric scale (hi - lo) / maxq and
    zero round(-lo / scale); symmetric scale 2 max|w| / maxq and zero (maxq + 1) / 2; an empty range gets scale 1."""
    maxq = 2**bits - 1
    if sym:
        scale = 2 * torch.maximum(-lo, hi) / maxq
        scale[scale == 0] = 1.0
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    scale = (hi - lo) / maxq
    scale[scale == 0] = 1.0
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def sparsegpt(weight: Tensor, H: Tensor, sparsity: float = 0.5, blocksize: int = 128, nm: tuple[int, int] | None = None,
              damp: float = 0.01, follow: Tensor | None = None, grid: tuple[int, int, bool] | None = None,
              follow_codes: Tensor | None = None, follow_weight: Tensor | None = None) -> Selection:
    """SparseGPT in float64 from the Hessian H = 2 X^T X / n of the layer's inputs.

    Dead inputs (zero diagonal) get 1 on the diagonal and their weight columns zeroed, then the
    damping `damp * mean(diag H)` is added, as the paper's code does. The saliency of weight (r, i)
    is w^2 / [H_F^-1]_00 over the remaining columns F = {i, i+1, ...}. Unstructured: at each block
    start, over the whole block, the paper's threshold sort(score)[int(numel * sparsity)] with
    score <= threshold removed. N:M (`nm`): the n lowest of each row's group of m, at the group's
    first column. Then column i's removed weights are zeroed and the error spread over the
    remaining columns with row 0 of [H_F^-1].

    With `grid` (bits, group size or -1, symmetric): each kept weight is rounded to its group's grid and its
    rounding error spread by the same OBS step as a removed weight's (GPTQ). A group's grid is fixed at its first
    column from the weights as updated so far, over the weights it keeps (0 always inside the range): the mask
    already chosen there, and for its columns whose mask is chosen later, the mask the same rule would choose
    from the current weights. Masks are then chosen at each block start where blocks begin every `blocksize`
    columns and, when the group size does not divide `blocksize`, also at every group start. `follow_codes`
    (rows, cols) makes the kept weights take given codes (the reference's own are in `chosen_codes`);
    `follow_weight` the codes of a given dequantized weight on the reference's grid (a written checkpoint's).
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

    def block_rule(x: Tensor, dx: Tensor) -> Tensor:  # the unstructured rule over one block, from its weights x
        score = x**2 / dx
        k = int(score.numel() * sparsity)
        return score <= score.flatten().sort().values[k] if k < score.numel() else torch.ones_like(score, dtype=torch.bool)

    group = cols if grid is None or grid[1] == -1 else grid[1]
    starts = set(range(0, cols, blocksize)) | (set(range(0, cols, group)) if grid and blocksize % group else set())
    ends = {a: b for a, b in zip(sorted(starts), sorted(starts)[1:] + [cols])}
    if grid is not None:
        bits, _, sym = grid
        maxq = 2**bits - 1
        codes = torch.zeros(rows, cols, dtype=torch.float64)
        chosen_codes = torch.zeros(rows, cols, dtype=torch.float64)
        code_gap = torch.zeros(rows, cols, dtype=torch.float64)
        scales = torch.zeros(rows, cols // group, dtype=torch.float64)
        zeros = torch.zeros(rows, cols // group, dtype=torch.float64)
    block_end = 0
    for i in range(cols):
        if nm is None and i in starts:
            i2 = block_end = ends[i]
            score = W[:, i:i2] ** 2 / d[i:i2]  # (rows, count)
            k = int(score.numel() * sparsity)
            if k < score.numel():  # the paper removes score <= sort(score)[k]: k + 1 weights, and exact ties
                flat = score.reshape(1, -1)
                c, g = lowest(flat, int((flat <= flat.sort().values[0, k]).sum()), prefer(i, i2))
                chosen[:, i:i2], gap[:, i:i2] = c.view_as(score), g.view_as(score)
        elif nm is not None and i % nm[1] == 0:
            i2 = block_end = i + nm[1]
            score = W[:, i:i2] ** 2 / d[i:i2]  # (rows, m)
            chosen[:, i:i2], gap[:, i:i2] = lowest(score, nm[0], prefer(i, i2))
        q = W[:, i].masked_fill(applied[:, i], 0.0)
        if grid is not None:
            if i % group == 0:  # the group's grid, from the weights it keeps as they are now
                e = i + group
                known = e if nm is None and sparsity == 0 else min(e, block_end)
                removed = torch.zeros(rows, group, dtype=torch.bool)
                # the mask chosen here by the rule (equal to a followed one but near ties; a mask read from a written
                # weight's zeros also holds kept weights rounded to 0, which count in the range)
                removed[:, : known - i] = chosen[:, i:known]
                a = known
                while a < e:  # columns whose mask comes later: the mask the rule would choose now
                    b = ends[a] if nm is None else a + nm[1]
                    if nm is None:
                        removed[:, a - i : b - i] = block_rule(W[:, a:b], d[a:b])
                    else:
                        removed[:, a - i : b - i] = lowest(W[:, a:b] ** 2 / d[a:b], nm[0])[0]
                    a = b
                kept = W[:, i:e].masked_fill(removed, 0.0)
                s, z = grid_params(kept.min(1).values.clamp(max=0), kept.max(1).values.clamp(min=0), bits, sym)
                scales[:, i // group], zeros[:, i // group] = s, z
            s, z = scales[:, i // group], zeros[:, i // group]
            ratio = W[:, i] / s
            own = (torch.round(ratio) + z).clamp(0, maxq)
            chosen_codes[:, i] = own
            code_gap[:, i] = (ratio - ratio.floor() - 0.5).abs()
            code = own if follow_codes is None else follow_codes[:, i].double()
            if follow_weight is not None:
                code = (torch.round(follow_weight[:, i].double() / s) + z).clamp(0, maxq)
            code = torch.where(applied[:, i], z, code)
            codes[:, i] = code
            q = (code - z) * s
        W[:, i:] -= torch.outer((W[:, i] - q) / d[i], inv_rows[i])  # OBS: removes column i's error optimally
        W[:, i] = q
    W[:, dead] = 0.0
    chosen[:, dead] = True  # removed whatever the scores said, as their weights are zeroed
    gap[:, dead] = math.inf
    if grid is None:
        return Selection(W, applied.clone(), chosen, gap)
    return Selection(W, applied.clone(), chosen, gap, codes, chosen_codes, code_gap, scales, zeros)


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

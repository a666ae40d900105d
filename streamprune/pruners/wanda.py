"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from torch import Tensor

from streamprune.pruners.base import ScorePruner
from streamprune.pruners.masks import row_mask, row_mask_exact


class Wanda(ScorePruner):
    statistics = "norms"  # only ||X_j||^2, a vector: no d x d matrix unless the reconstruction errors ask for it
    solve_bytes_per_element = 9  # float32 weight, scores and mask

    def score(self, w: Tensor) -> Tensor:
        sqnorms = self.column_sqnorms()
        assert sqnorms is not None, "no calibration batch was added"
        return w.abs().mul_(sqnorms.sqrt()[None, :])

    def unstructured_mask(self, score: Tensor, zeros: int | None = None) -> Tensor:
        return row_mask(score, self.sparsity) if zeros is None else row_mask_exact(score, zeros)

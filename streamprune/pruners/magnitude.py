"""Magnitude pruning: remove the smallest |W| of each matrix (or of each N:M group)."""

from __future__ import annotations

from torch import Tensor

from streamprune.pruners.base import ScorePruner
from streamprune.pruners.masks import matrix_mask


class Magnitude(ScorePruner):
    needs_data = False
    statistics = ""  # calibration data serves only the reconstruction errors, when they are asked for
    solve_bytes_per_element = 13  # float32 weight, scores, mask, and the copy its k-th smallest score is drawn from

    def score(self, w: Tensor) -> Tensor:
        return w.abs()

    def unstructured_mask(self, score: Tensor, zeros: int | None = None) -> Tensor:
        return matrix_mask(score, self.sparsity, zeros)

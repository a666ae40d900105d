"""Magnitude pruning: remove the smallest |W| of each matrix (or of each N:M group)."""

from __future__ import annotations

import torch
from torch import Tensor

from streamprune.pruners.base import Pruner, PruneResult
from streamprune.pruners.masks import matrix_mask, nm_mask


class Magnitude(Pruner):
    needs_data = False  # statistics are gathered only when a report of reconstruction error is wanted

    @torch.no_grad()
    def prune(self, weight: Tensor) -> PruneResult:
        self._park_hessian()  # only the reconstruction error reads X^T X
        w = weight.to(self.device, torch.float32, copy=True)  # filled in place below
        score = w.abs()
        if self.pattern.structured:
            mask = nm_mask(score, self.pattern.n, self.pattern.m)
        else:
            mask = matrix_mask(score, self.sparsity)
        del score
        return PruneResult(w.masked_fill_(mask, 0.0), mask)

"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch
from torch import Tensor

from streamprune.pruners.base import Pruner, PruneResult
from streamprune.pruners.masks import nm_mask, row_mask


class Wanda(Pruner):
    @torch.no_grad()
    def prune(self, weight: Tensor) -> PruneResult:
        assert self.xtx is not None
        w = weight.to(self.device, torch.float32, copy=True)  # filled in place below
        norms = self.xtx.diagonal().sqrt().to(self.device)  # diag(X^T X)_j = ||X_j||^2
        self._park_hessian()
        score = w.abs() * norms[None, :]
        if self.pattern.structured:
            mask = nm_mask(score, self.pattern.n, self.pattern.m)
        else:
            mask = row_mask(score, self.sparsity)
        del score
        return PruneResult(w.masked_fill_(mask, 0.0), mask)

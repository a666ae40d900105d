"""The pruner lifecycle shared by every method: accumulate, prune, free."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from streamprune.pruners.masks import Pattern


@dataclass
class PruneResult:
    weight: Tensor  # float32, pruned (and for SparseGPT, updated) weight
    mask: Tensor  # True where a weight was removed
    info: dict[str, float] = field(default_factory=dict)


class Pruner(ABC):
    """Prunes the linears that read one input.

    `add_batch(x)` accumulates the input Hessian H = (2/n) sum x^T x over n calibration tokens in
    float32, as chunked GEMMs; `prune(w)` may be called once per linear that reads the same input
    (q/k/v, gate/up), which all share this Hessian; `free()` releases it.
    """

    needs_data = True

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern) -> None:
        self.columns = columns
        self.device = device
        self.sparsity = sparsity
        self.pattern = pattern
        self.xtx: Tensor | None = torch.zeros(columns, columns, device=device) if self.needs_data else None
        self.ntokens = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        if self.xtx is None:
            self.xtx = torch.zeros(self.columns, self.columns, device=self.device)
        x = x.reshape(-1, self.columns).to(self.device, torch.float32)  # (tokens, columns)
        self.xtx.addmm_(x.T, x)
        self.ntokens += x.shape[0]

    @abstractmethod
    def prune(self, weight: Tensor) -> PruneResult:
        """Prune one weight (out, columns); returns the new float32 weight and its mask."""

    def reconstruction_error(self, dense: Tensor, pruned: Tensor) -> float | None:
        """||W X - W' X||^2 / ||W X||^2 over the calibration inputs, from the accumulated X^T X
        (any positive scaling of it gives the same ratio)."""
        if self.xtx is None:
            return None
        dense = dense.to(self.device, torch.float32)
        delta = dense - pruned.to(self.device, torch.float32)
        num = ((delta @ self.xtx) * delta).sum()
        den = ((dense @ self.xtx) * dense).sum()
        return float(num / den) if den > 0 else 0.0

    def free(self) -> None:
        self.xtx = None

"""The pruner lifecycle shared by every method: accumulate, prune, free."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from streamprune.pruners.factor import rows_per_chunk
from streamprune.pruners.masks import Pattern


@dataclass
class PruneResult:
    weight: Tensor  # float32, pruned (and for SparseGPT, updated) weight; may be a transposed view
    mask: Tensor  # True where a weight was removed; may be a transposed view
    info: dict[str, float] = field(default_factory=dict)


class Pruner(ABC):
    """Prunes the linears that read one input.

    `add_batch(x)` accumulates X^T X over the calibration tokens in float32, as chunked GEMMs (the
    input Hessian is H = 2 X^T X / n); `prune(w)` may be called once per linear that reads the same
    input (q/k/v, gate/up), which all share it; `release_solver()` drops what the solve needed beyond
    X^T X; `reconstruction_error(...)` then scores each pruned linear; `free()` releases the rest.
    With `offload_hessian`, X^T X waits in host memory from the start of the solve until the errors
    need it, so the solve's device memory holds at most one d x d matrix (SparseGPT's inverse factor,
    built in X^T X's own buffer) and none for Wanda and magnitude.
    """

    needs_data = True

    def __init__(self, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                 offload_hessian: bool = False) -> None:
        self.columns = columns
        self.device = device
        self.sparsity = sparsity
        self.pattern = pattern
        self.offload_hessian = offload_hessian
        self.xtx: Tensor | None = torch.zeros(columns, columns, device=device) if self.needs_data else None
        self.ntokens = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        if self.xtx is None:
            self.xtx = torch.zeros(self.columns, self.columns, device=self.device)
        assert self.xtx.device == self.device, "no batch may be added once the solve has started"
        x = x.reshape(-1, self.columns).to(self.device, torch.float32)  # (tokens, columns)
        self.xtx.addmm_(x.T, x)
        self.ntokens += x.shape[0]

    @abstractmethod
    def prune(self, weight: Tensor) -> PruneResult:
        """Prune one weight (out, columns); returns the new float32 weight and its mask."""

    def _park_hessian(self) -> None:
        """With `offload_hessian`, move X^T X to host memory (freeing its device buffer) until the errors."""
        if self.offload_hessian and self.xtx is not None:
            self.xtx = self.xtx.to("cpu")

    def release_solver(self) -> None:
        """Drop the solver's state once every linear of this input is pruned (before the errors)."""

    @torch.no_grad()
    def reconstruction_error(self, dense: Tensor, pruned: Tensor) -> float | None:
        """||W X - W' X||^2 / ||W X||^2 over the calibration inputs, from the accumulated X^T X, in
        chunks of rows (so the workspace stays small beside a wide X^T X)."""
        if self.xtx is None:
            return None
        self.release_solver()
        if self.xtx.device != self.device:  # back from host memory, now that the solver's matrix is gone
            self.xtx = self.xtx.to(self.device)
        num = den = 0.0
        chunk = rows_per_chunk(self.columns)
        for r0 in range(0, dense.shape[0], chunk):
            w = dense[r0 : r0 + chunk].to(self.device, torch.float32)
            delta = w - pruned[r0 : r0 + w.shape[0]].to(self.device, torch.float32)
            num += float(((delta @ self.xtx) * delta).sum())
            den += float(((w @ self.xtx) * w).sum())
        return num / den if den > 0 else 0.0

    def free(self) -> None:
        self.xtx = None

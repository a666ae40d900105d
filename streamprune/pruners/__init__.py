"""Pruning methods behind one interface, and the registry that names them."""

from __future__ import annotations

import torch

from streamprune.errors import ArgumentError
from streamprune.pruners.base import Pruner, PruneResult
from streamprune.pruners.magnitude import Magnitude
from streamprune.pruners.masks import Pattern, resolve_sparsity
from streamprune.pruners.sparsegpt import SparseGPT
from streamprune.pruners.wanda import Wanda

METHODS: dict[str, type[Pruner]] = {"sparsegpt": SparseGPT, "wanda": Wanda, "magnitude": Magnitude}


def make_pruner(method: str, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                blocksize: int = 128, damp: float = 0.01, offload_hessian: bool = False) -> Pruner:
    if method not in METHODS:
        raise ArgumentError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "sparsegpt":
        return SparseGPT(columns, device, sparsity, pattern, blocksize=blocksize, damp=damp,
                         offload_hessian=offload_hessian)
    return METHODS[method](columns, device, sparsity, pattern, offload_hessian)


__all__ = ["METHODS", "Pattern", "PruneResult", "Pruner", "make_pruner", "resolve_sparsity"]

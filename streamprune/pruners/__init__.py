"""Pruning methods behind one interface, and the registry that names them."""

from __future__ import annotations

from typing import Any

import torch

from streamprune.errors import ArgumentError
from streamprune.pruners.admm import ADMM
from streamprune.pruners.base import Pruner, PruneResult
from streamprune.pruners.magnitude import Magnitude
from streamprune.pruners.masks import Pattern, resolve_sparsity
from streamprune.pruners.quant import Grid, Quantized
from streamprune.pruners.sparsegpt import SparseGPT
from streamprune.pruners.wanda import Wanda

METHODS: dict[str, type[Pruner]] = {"sparsegpt": SparseGPT, "admm": ADMM, "wanda": Wanda, "magnitude": Magnitude}


def method(name: str) -> type[Pruner]:
    if name not in METHODS:
        raise ArgumentError(f"method {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def make_pruner(name: str, columns: int, device: torch.device, sparsity: float, pattern: Pattern,
                offload_hessian: bool = False, errors: bool | None = None, grid: Grid | None = None,
                **knobs: Any) -> Pruner:
    """A pruner of method `name`; `knobs` may hold any options, each method takes its own; `errors` (None: the
    method's default) keeps X^T X for the reconstruction errors; `grid` quantizes the kept weights."""
    cls = method(name)
    own = {k: knobs[k] for k in cls.knobs if k in knobs}
    return cls(columns, device, sparsity, pattern, offload_hessian, default_errors(cls, errors), grid=grid, **own)


def default_errors(cls: type[Pruner], errors: bool | None) -> bool:
    """Reconstruction errors are computed where X^T X is at hand anyway, unless asked otherwise."""
    return cls.statistics == "xtx" if errors is None else errors


__all__ = ["METHODS", "Grid", "Pattern", "Quantized", "PruneResult", "Pruner", "default_errors", "make_pruner", "method",
           "resolve_sparsity"]

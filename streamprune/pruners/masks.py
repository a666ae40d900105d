"""Sparsity patterns and the masks that realise them. A mask is True where a weight is removed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streamprune.errors import ArgumentError
from streamprune.pruners.factor import rows_per_chunk


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n == m == 0) or N:M: at least n zeros in every m consecutive inputs of a row."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise ArgumentError(f"pattern {text!r} is not 'unstructured' or N:M such as 2:4")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ArgumentError(f"pattern {text!r}: N:M needs 0 < N < M")
        return cls(n, m)

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The fraction of weights to remove: given, or implied by N:M (which must then agree)."""
    if pattern.structured:
        implied = pattern.n / pattern.m
        if sparsity is not None and not math.isclose(sparsity, implied):
            raise ArgumentError(f"sparsity {sparsity!r} contradicts pattern {pattern} (which removes {implied:g})")
        return implied
    if sparsity is None:
        return 0.5
    if not 0.0 <= sparsity < 1.0:
        raise ArgumentError(f"sparsity {sparsity!r} is outside [0, 1)")
    return sparsity


def check_columns(columns: int, pattern: Pattern, what: str) -> None:
    if pattern.structured and columns % pattern.m:
        raise ArgumentError(f"{what}: {columns} input columns are not divisible by M={pattern.m} of pattern {pattern}")


def kth_smallest(x: Tensor, k: int) -> Tensor:
    """The k-th smallest element (0-based) of a 1-D tensor; numpy's introselect is far faster on the CPU."""
    if x.device.type == "cpu":
        return torch.as_tensor(np.partition(x.numpy(), k)[k])
    return x.kthvalue(k + 1).values


def row_kth_smallest(score: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) element of each row, as a column (rows, 1); numpy's introselect is far faster on
    the CPU than `kthvalue`, and runs on row chunks (its copies stay a few MiB)."""
    if score.device.type != "cpu":
        return score.kthvalue(k, dim=1, keepdim=True).values
    step = rows_per_chunk(score.shape[1])
    return torch.cat([torch.from_numpy(np.partition(score[r0 : r0 + step].numpy(), k - 1, axis=1)[:, k - 1 : k])
                      for r0 in range(0, score.shape[0], step)])


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """The n lowest-scoring weights of every group of m consecutive columns of each row."""
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    step = rows_per_chunk(cols)
    for r0 in range(0, rows, step):  # the top-k temporaries stay a few MiB
        groups = score[r0 : r0 + step].reshape(-1, cols // m, m)  # (rows, groups, m)
        idx = groups.topk(n, dim=-1, largest=False).indices
        mask[r0 : r0 + step].view(-1, cols // m, m).scatter_(-1, idx, True)
    return mask


def row_mask(score: Tensor, sparsity: float) -> Tensor:
    """The ceil(sparsity * cols) lowest-scoring weights of each row (so the matrix reaches `sparsity`)."""
    rows, cols = score.shape
    k = math.ceil(sparsity * cols - 1e-9)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        step = rows_per_chunk(cols)
        for r0 in range(0, rows, step):
            mask[r0 : r0 + step].scatter_(1, score[r0 : r0 + step].topk(k, dim=1, largest=False).indices, True)
    return mask


def row_mask_exact(score: Tensor, zeros: int) -> Tensor:
    """Exactly `zeros` lowest-scoring weights, compared within each row as `row_mask` does: every row loses
    zeros // rows, and the zeros % rows rows whose next weight scores lowest lose one more."""
    rows, cols = score.shape
    if not 0 <= zeros <= rows * cols:
        raise ValueError(f"zeros {zeros!r} is outside [0, {rows * cols}]")
    k, extra = divmod(zeros, rows)
    mask = torch.zeros_like(score, dtype=torch.bool)
    step = rows_per_chunk(cols)
    take = torch.full((rows,), k, dtype=torch.int64, device=score.device)
    if extra:  # the (k+1)-th smallest score of each row decides which rows give one more
        following = torch.cat([score[r0 : r0 + step].kthvalue(k + 1, dim=1).values for r0 in range(0, rows, step)])
        take[following.topk(extra, largest=False).indices] += 1
    width = k + (1 if extra else 0)
    if width:
        rank = torch.arange(width, device=score.device)[None, :]
        for r0 in range(0, rows, step):
            idx = score[r0 : r0 + step].topk(width, dim=1, largest=False).indices  # sorted: the lowest first
            mask[r0 : r0 + step].scatter_(1, idx, rank < take[r0 : r0 + step, None])
    return mask


def matrix_mask(score: Tensor, sparsity: float, zeros: int | None = None) -> Tensor:
    """The floor(sparsity * numel) lowest-scoring weights of the whole matrix (exactly `zeros` when given):
    everything below the k-th smallest score, then as many of the scores equal to it as needed, first in
    row-major order."""
    k = int(sparsity * score.numel()) if zeros is None else zeros
    if not k:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score.flatten()
    threshold = kth_smallest(flat, k - 1)
    mask = score < threshold
    ties = k - int(mask.sum())
    if ties:
        tied = (flat == threshold).nonzero().squeeze(1)[:ties]
        mask.view(-1)[tied] = True
    return mask

"""OWL, outlier-weighted layerwise sparsity (Yin et al., 2024): each block's own sparsity, from its outliers.

A block's outlier ratio is the share of its pruned weights whose Wanda score |W_ij| * ||X_j|| exceeds M times
the mean score over all of them, with ||X_j|| the norm of input column j over the calibration tokens entering
the dense model's block. The ratios are scaled into [0, 2 lambda] and centred on the target: a block with more
outliers keeps more weights,

    s_b = target - (r~_b - mean(r~)),    r~_b = 2 lambda (r_b - min r) / (max r - min r)

where the mean is weighted by each block's pruned weight count (the paper's blocks are all alike; the weighting
keeps the mean over all pruned weights equal to the target for any model). The statistics come from one
forward of the dense model over the calibration windows, before the first block is pruned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from streamprune.activations import Activations
from streamprune.arch import SEQUENTIAL, Role, Site
from streamprune.arch.block import LayerPositions
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError
from streamprune.forward import forward_block
from streamprune.loop import Consumer
from streamprune.pruners.factor import rows_per_chunk
from streamprune.stream import Part

ALLOCATIONS = ("uniform", "owl")
OWL_LAMBDA = 0.08  # the paper's and its code's README value for unstructured sparsity
OWL_M = 5.0  # the same (its main.py's argparse default is 3; every published command passes 5)


@dataclass
class Allocation:
    """Per-block sparsities and what they were computed from."""

    method: str  # "owl"
    owl_lambda: float
    owl_m: float
    outlier_ratios: list[float]  # per block: the share of its pruned weights that are outliers
    block_weights: list[int]  # per block: its pruned weight count
    block_sparsity: list[float]  # per block: the fraction of its pruned weights removed

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def outlier_ratio(weights: list[tuple[Tensor, Tensor]], m: float) -> float:
    """The share of the Wanda scores |W_ij| * ||X_j|| above `m` times their mean, over every (weight, ||X_j||^2)
    pair of a block. Two passes over the weights in row chunks (the mean first), so no score matrix is kept."""

    total, count = 0.0, 0
    for w, sqnorms in weights:
        for chunk in _chunks(w, sqnorms):
            total += float(chunk.sum(dtype=torch.float64))
            count += chunk.numel()
    threshold = m * total / count
    above = sum(int((chunk > threshold).sum()) for w, sqnorms in weights for chunk in _chunks(w, sqnorms))
    return above / count


def _chunks(w: Tensor, sqnorms: Tensor) -> Iterator[Tensor]:
    """The Wanda scores of `w`, a few MiB of rows at a time."""
    norms = sqnorms.to(w.device, torch.float32).sqrt()[None, :]
    step = rows_per_chunk(w.shape[1])
    for r0 in range(0, w.shape[0], step):
        yield w[r0 : r0 + step].abs().float().mul_(norms)


def allocate(ratios: list[float], weights: list[int], target: float, owl_lambda: float) -> list[float]:
    """Each block's sparsity from its outlier ratio (see the module docstring); uniform when every ratio is equal
    or lambda is 0. The mean over all pruned weights is `target` up to float rounding."""
    if owl_lambda == 0 or max(ratios) == min(ratios):
        return [target] * len(ratios)
    lo, hi = min(ratios), max(ratios)
    spread = [2 * owl_lambda * (r - lo) / (hi - lo) for r in ratios]
    centre = math.fsum(s * n for s, n in zip(spread, weights)) / sum(weights)
    sparsity = [target - (s - centre) for s in spread]
    if min(sparsity) < 0 or max(sparsity) >= 1:
        raise ArgumentError(f"owl-lambda {owl_lambda!r} moves block sparsities outside [0, 1) around sparsity "
                            f"{target!r} (from {min(sparsity):.4f} to {max(sparsity):.4f}); choose a smaller lambda")
    return sparsity


def linear_zeros(linears: list[tuple[str, int, float]]) -> dict[str, int]:
    """The weights each linear removes, from (name, weight count, its block's sparsity) in a fixed order: the
    cumulative ideal count, rounded, so every linear is within one weight of its block's sparsity and the total is
    round(sum of sparsity x count) exactly (rounding never accumulates along the model)."""
    zeros, ideal, done = {}, 0.0, 0
    for name, numel, sparsity in linears:
        ideal += sparsity * numel
        z = min(numel, max(0, math.floor(ideal + 0.5) - done))
        zeros[name] = z
        done += z
    return zeros


def block_linears(ckpt: Checkpoint, bid: int) -> dict[Role, tuple[Site, str]]:
    """The pruned linears of dense block `bid`: role -> (the site whose input it reads, checkpoint name)."""
    site_of = {role: site for site, roles in SEQUENTIAL for role in roles}
    return {role: (site_of[role], name) for role, name in ckpt.pruned_linears(bid).items()}


def pruned_counts(ckpt: Checkpoint) -> list[int]:
    """Each block's pruned weight count."""
    return [sum(math.prod(ckpt.tensors[name].shape) for _, name in block_linears(ckpt, b).values())
            for b in range(ckpt.config.n_layers)]


class OutlierRatios(Consumer):
    """Every block's outlier ratio, as a consumer of the block loop over the dense model (`loop.walk`): each block
    runs forward over the embedded windows in `x` (updated in place: it holds the last block's output at the end),
    each site's input column norms accumulated as it runs (a vector per site, no X^T X). `reduce` sums each site's
    squared norms in place over the processes of a run that share the windows. Models with routed experts are not
    allocated by OWL: a block's experts never arrive here."""

    def __init__(self, ckpt: Checkpoint, x: Activations, pos: LayerPositions, batch: int, device: torch.device,
                 m: float, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        self.ckpt, self.x, self.pos, self.batch, self.device, self.m, self.reduce = ckpt, x, pos, batch, device, m, reduce
        self.ratios: list[float] = []

    @torch.no_grad()
    def enter(self, block: Part) -> None:
        sqnorms: dict[Site, Tensor] = {}

        def tap(site: Site, a: Tensor) -> None:
            a = a.reshape(-1, a.shape[-1]).to(self.device, torch.float32)  # (tokens, columns)
            s = torch.linalg.vector_norm(a, dim=0).square_()
            if site in sqnorms:
                sqnorms[site].add_(s)
            else:
                sqnorms[site] = s

        forward_block(self.ckpt, block.w, self.x, self.pos.of(block.bid), self.x, self.batch, self.device, tap=tap)
        for site in sorted(sqnorms, key=lambda site: site.value):  # the same order on every process
            self.reduce(sqnorms[site])
        linears = block_linears(self.ckpt, block.bid)
        self.ratios.append(outlier_ratio([(block.w[(role, "weight")], sqnorms[site])
                                          for role, (site, _) in linears.items()], self.m))

    def expert(self, expert: Part) -> None:
        raise AssertionError("OWL allocates models without routed experts")

"""Removing whole routed experts: each expert of an MoE block scored from the calibration tokens its router sends it,
the lowest-scoring ones removed, the same count in every MoE block (REAP, arXiv 2510.13999, and its baselines).

    reap       S_j = mean over the tokens x routed to j of g_j(x) * ||f_j(x)||
    ean        S_j = sum over the tokens x routed to j of ||f_j(x)||
    frequency  S_j = the number of tokens routed to j
    random     S_j uniform in [0, 1), drawn from --seed and the block's index

g_j(x) is the weight by which the block multiplies expert j's output for token x (after the top-k renormalization
of the families that renormalize), f_j(x) the expert's output before that weight; an expert no token reaches scores
0. Ties remove the later expert. The kept experts keep their order, numbered 0..K-1, and the router keeps their rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from streamprune.activations import Activations
from streamprune.arch import ModelConfig, Role
from streamprune.arch.block import Weights, expert_hidden, linear
from streamprune.errors import ArgumentError
from streamprune.forward import Routes

logger = logging.getLogger(__name__)

EXPERT_CRITERIA = ("reap", "ean", "frequency", "random")


def kept_experts(cfg: ModelConfig, fraction: float, multiple: int) -> int:
    """How many routed experts each MoE block keeps when `fraction` of them are removed (floor(fraction x n)), the
    count rounded down to a multiple of `multiple`; refused when fewer than a token is routed to remain."""
    n = cfg.n_experts
    if not n:
        raise ArgumentError(f"--prune-experts {fraction!r}: model_type {cfg.model_type!r} has no routed experts")
    if not 0 < fraction < 1:
        raise ArgumentError(f"--prune-experts {fraction!r} must be a fraction in (0, 1)")
    removed = math.floor(fraction * n)
    kept = (n - removed) // multiple * multiple
    if kept < cfg.experts_per_tok:
        rounded = f", rounded down to a multiple of {multiple}" if multiple > 1 else ""
        raise ArgumentError(f"--prune-experts {fraction:g} keeps {kept} of {n} experts per block ({n} - floor("
                            f"{fraction:g} x {n}) = {n - removed}{rounded}), fewer than the {cfg.experts_per_tok} each "
                            "token is routed to (num_experts_per_tok)")
    if kept == n:
        logger.warning("--prune-experts %g removes none of the %d routed experts of a block (floor(%g x %d) = 0)",
                       fraction, n, fraction, n)
    return kept


@dataclass
class Tally:
    """One expert's sums over the calibration tokens routed to it."""

    tokens: int = 0
    norm: float = 0.0  # sum of ||f_j(x)||
    weighted_norm: float = 0.0  # sum of g_j(x) ||f_j(x)||

    def score(self, criterion: str) -> float:
        if criterion == "reap":
            return self.weighted_norm / self.tokens if self.tokens else 0.0
        if criterion == "ean":
            return self.norm
        assert criterion == "frequency", criterion
        return float(self.tokens)


@torch.no_grad()
def tally(cfg: ModelConfig, we: Weights, rows: Routes, m: Activations, device: torch.device) -> Tally:
    """Expert `we`'s sums over its token rows (`forward.routed_rows`) of the MoE input `m`; norms in float64."""
    t = Tally()
    for i, j, token, weight in rows:
        if token.numel():
            f = linear(we, Role.FFN_DOWN_EXP, expert_hidden(cfg, we, m.rows(i, j, token, device)))  # (n, D)
            norms = torch.linalg.vector_norm(f.double(), dim=-1)  # (n,)
            t.tokens += int(token.numel())
            t.norm += float(norms.sum())
            t.weighted_norm += float((weight.double() * norms).sum())
    return t


def random_scores(n: int, seed: int, bid: int) -> list[float]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + bid)
    return torch.rand(n, generator=g, dtype=torch.float64).tolist()


def choose(scores: list[float], kept: int) -> list[int]:
    """The experts kept: all but the lowest-scoring ones (of equal scores, the later one goes first), in order."""
    removed = sorted(range(len(scores)), key=lambda x: (scores[x], -x))[:len(scores) - kept]
    return [x for x in range(len(scores)) if x not in set(removed)]


def decision(bid: int, criterion: str, scores: list[float], tallies: list[Tally] | None, kept: list[int]) -> dict:
    """The report's and the journal's record of one MoE block's choice."""
    new = {x: k for k, x in enumerate(kept)}
    return {"block": bid, "criterion": criterion, "kept": len(kept), "removed": [x for x in range(len(scores))
                                                                               if x not in new],
            "experts": [{"expert": x, "score": s, "routed_tokens": None if tallies is None else tallies[x].tokens,
                         "kept": x in new, "index": new.get(x)} for x, s in enumerate(scores)]}

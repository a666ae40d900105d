"""Removing whole routed experts: each expert of an MoE block scored from the calibration tokens its router sends it,
the lowest-scoring ones removed, the same count in every MoE block (REAP, arXiv 2510.13999, and its baselines).

    reap       S_j = mean over the tokens x routed to j of g_j(x) * ||f_j(x)||
    ean        S_j = sum over the tokens x routed to j of ||f_j(x)||
    frequency  S_j = the number of tokens routed to j
    random     S_j uniform in [0, 1), drawn from --seed and the block's index

g_j(x) is the weight by which the block multiplies expert j's output for token x (after the top-k renormalization
of the families that renormalize), f_j(x) the expert's output before that weight; an expert no token reaches scores
0. Ties remove the later expert. The kept experts keep their order, numbered 0..K-1, and the router keeps their rows.
A group-limited router (DeepSeek-V3, GLM-4.5: `n_group` groups of consecutive experts) loses the same number of
experts in every group, the lowest-scoring of each, so that its groups stay whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamprune.activations import Activations
from streamprune.arch import ModelConfig, Role
from streamprune.arch.block import Weights, expert_hidden, expert_input, linear
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError
from streamprune.forward import Routes
from streamprune.journal import model_digest

logger = logging.getLogger(__name__)

EXPERT_CRITERIA = ("reap", "ean", "frequency", "random")
COMPENSATION_DAMP = 0.01  # --compensate-experts: the least squares' ridge, relative to its mean diagonal


def kept_experts(cfg: ModelConfig, fraction: float, multiple: int) -> int:
    """How many routed experts each MoE block keeps when `fraction` of them are removed (floor(fraction x n)), the
    count rounded down to a multiple of `multiple`; refused when fewer than a token is routed to remain. With
    groups, floor(fraction x n / n_group) go from each group, and the count kept is a multiple of n_group."""
    n, g = cfg.n_experts, cfg.n_group
    if not n:
        raise ArgumentError(f"--prune-experts {fraction!r}: model_type {cfg.model_type!r} has no routed experts")
    if not 0 <= fraction < 1:
        raise ArgumentError(f"--prune-experts {fraction!r} must be a fraction in [0, 1) (0: every expert scored, "
                            "none removed)")
    per_group = n // g - math.floor(fraction * n / g)
    while per_group > 0 and per_group * g % multiple:
        per_group -= 1
    kept = per_group * g
    reachable = min(kept, cfg.topk_group * per_group)  # a token chooses among its best topk_group groups
    if reachable < cfg.experts_per_tok:
        rounded = f", rounded down to a multiple of {multiple}" if multiple > 1 else ""
        how = (f"{n} - floor({fraction:g} x {n}) = {n - math.floor(fraction * n)}" if g == 1 else
               f"{n // g} - floor({fraction:g} x {n // g}) in each of {g} groups")
        where = "" if g == 1 else f", {reachable} of them in the {cfg.topk_group} groups a token chooses from"
        raise ArgumentError(f"--prune-experts {fraction:g} keeps {kept} of {n} experts per block ({how}{rounded}"
                            f"{where}), fewer than the {cfg.experts_per_tok} each token is routed to "
                            "(num_experts_per_tok)")
    if g > 1 and per_group < 2:  # a group's score is the sum of its two best experts'
        raise ArgumentError(f"--prune-experts {fraction:g} leaves {per_group} of {n // g} experts in each of the {g} "
                            "groups of the router (n_group), which scores a group by its two best experts: keep at "
                            "least 2 per group")
    if kept == n and fraction > 0:
        logger.warning("--prune-experts %g removes none of the %d routed experts of a block (floor(%g x %d) = 0)",
                       fraction, n, fraction, n)
    return kept


@dataclass(frozen=True)
class Removal:
    """What a job does to the routed experts of each MoE block (--prune-experts): keeps `kept` of them, those
    `criterion` scores highest, or with `scores` (--expert-scores) those the scores of a report rank highest."""

    kept: int
    criterion: str
    scores: dict[int, list[float]] | None = None  # per MoE block, from the report named in `source`
    source: dict[str, Any] | None = None  # where `scores` came from: the report's file, sha256 and criterion
    compensate: bool = False  # --compensate-experts: the kept experts' down projections fitted to the dense block

    @property
    def surveys(self) -> bool:
        """The block's experts are read twice: a survey (scores from the calibration data, or the dense block's
        output that compensation fits) before the pass that writes them."""
        return not self.known or self.compensate

    @property
    def known(self) -> bool:
        """The scores are known before the block's experts are read (a report's, or random ones)."""
        return self.scores is not None or self.criterion == "random"

    def of(self, bid: int, n: int, seed: int) -> list[float]:
        """The scores of block `bid`'s `n` experts when they are known up front."""
        return random_scores(n, seed, bid) if self.scores is None else self.scores[bid]


def load_scores(path: Path, ckpt: Checkpoint) -> tuple[dict[int, list[float]], dict[str, Any]]:
    """Every MoE block's expert scores from the report a run of this model wrote (`--prune-experts`, 0 to only score
    them), and where they came from; refused when the report holds none, or was made of a model with another expert
    count, or of another model."""
    label = f"--expert-scores {str(path)!r}"
    try:
        raw = path.read_bytes()
        report = json.loads(raw)
        blocks = {int(b["block"]): b for b in report["experts"]}
        scores = {bid: [float(e["score"]) for e in b["experts"]] for bid, b in blocks.items()}
        model = report["fingerprint"]["model"]
    except OSError as e:
        raise ArgumentError(f"{label}: cannot read: {e.strerror or e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ArgumentError(f"{label}: holds no expert scores (a report of `streamprune run --prune-experts`, 0 "
                            "to score without removing)") from e
    moe = {b: ckpt.n_experts(b) for b in range(ckpt.config.n_layers) if ckpt.n_experts(b)}
    for bid, n in moe.items():
        if len(scores.get(bid, [])) != n:
            got = f"{len(scores[bid])} experts' scores" if bid in scores else "no scores"
            raise ArgumentError(f"{label}: block {bid} has {got}; the model has {n} routed experts there")
    if sorted(scores) != sorted(moe) or model != model_digest(ckpt):
        raise ArgumentError(f"{label}: the scores of another model (its fingerprint's model differs from "
                            f"{str(ckpt.dir)!r})")
    criterion = str(blocks[min(blocks)].get("criterion"))
    return scores, {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "criterion": criterion}


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
def tally(cfg: ModelConfig, we: Weights, rows: Routes, m: Activations, device: torch.device,
          dense: Activations | None = None) -> Tally:
    """Expert `we`'s sums over its token rows (`forward.routed_rows`) of the MoE input `m`; norms in float64. With
    `dense`, its weighted output is added to those rows there (the dense block's output, which compensation fits)."""
    t = Tally()
    for i, j, token, weight in rows:
        if token.numel():
            x = expert_input(cfg, m.rows(i, j, token, device), weight)  # what the expert sees (weighted: Llama 4)
            f = linear(we, Role.FFN_DOWN_EXP, expert_hidden(cfg, we, x))  # (n, D)
            if dense is not None:
                dense.add_rows(i, j, token, f if cfg.weight_expert_input else f * weight[:, None])
            norms = torch.linalg.vector_norm(f.double(), dim=-1)  # (n,)
            t.tokens += int(token.numel())
            t.norm += float(norms.sum())
            # g_j(x) ||f_j(x)||: the norm of the expert's share of the output (||f_j(g_j x)|| where weighted before)
            t.weighted_norm += float(norms.sum() if cfg.weight_expert_input else (weight.double() * norms).sum())
    return t


def random_scores(n: int, seed: int, bid: int) -> list[float]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + bid)
    return torch.rand(n, generator=g, dtype=torch.float64).tolist()


def choose(scores: list[float], kept: int, groups: int = 1) -> list[int]:
    """The experts kept: all but the lowest-scoring ones (of equal scores, the later one goes first), in order; with
    `groups` groups of consecutive experts, the same number from each group."""
    size = len(scores) // groups
    removed: set[int] = set()
    for start in range(0, len(scores), size):
        members = range(start, start + size)
        removed.update(sorted(members, key=lambda x: (scores[x], -x))[:size - kept // groups])
    return [x for x in range(len(scores)) if x not in removed]


def decision(bid: int, criterion: str, scores: list[float], tallies: list[Tally] | None, kept: list[int],
             source: str | None = None) -> dict:
    """The report's and the journal's record of one MoE block's choice (`source`: the report the scores were read
    from, if any)."""
    new = {x: k for k, x in enumerate(kept)}
    return {"block": bid, "criterion": criterion, **({"scores_from": source} if source else {}), "kept": len(kept),
            "removed": [x for x in range(len(scores)) if x not in new],
            "experts": [{"expert": x, "score": s, "routed_tokens": None if tallies is None else tallies[x].tokens,
                         "kept": x in new, "index": new.get(x)} for x, s in enumerate(scores)]}


@torch.no_grad()
def compensated_down(cfg: ModelConfig, we: Weights, xid: int, routes: Routes, m: Activations, dense: Activations,
                     out: Activations, device: torch.device, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """Kept expert `xid`'s down projection fitted, by weighted least squares, to what the block's output needs from
    it on its calibration tokens (the reduced router's `routes`; MoE input `m`). The experts go in order: a token's
    last expert (the highest index among those it is routed to) is fitted to the rest of its dense output `dense`
    less `out` (the block's output so far, the experts before it added), so that the block's output on that token
    equals the dense block's as nearly as its hidden activations allow; on its other tokens it keeps its own output
    (the last one fits the rest). Each row weighs g^2, g what the expert's output is multiplied by: the token's
    routing weight, or 1 where the weight scales the expert's input instead (Llama 4). `reduce` sums the statistics
    over the ranks. Returns the weight in float32, (D, expert_ffn_dim)."""
    down = we[(Role.FFN_DOWN_EXP, "weight")]
    bias = we.get((Role.FFN_DOWN_EXP, "bias"))
    H = torch.zeros(down.shape[1], down.shape[1], dtype=torch.float64, device=device)
    C = torch.zeros(down.shape[0], down.shape[1], dtype=torch.float64, device=device)
    for i, j, chosen, weights in routes:
        token, slot = torch.where(chosen == xid)
        if not token.numel():
            continue
        weight = weights[token, slot]
        g = (torch.ones_like(weight) if cfg.weight_expert_input else weight).double()[:, None]  # (n, 1)
        h = expert_hidden(cfg, we, expert_input(cfg, m.rows(i, j, token, device), weight))  # (n, ffn)
        own = linear(we, Role.FFN_DOWN_EXP, h).double()
        rest = (dense.rows(i, j, token, device) - out.rows(i, j, token, device)).double() / g
        last = (chosen[token].max(dim=-1).values == xid)[:, None]
        target = torch.where(last, rest, own) - (0 if bias is None else bias.double())  # what W h should give
        h = h.double()
        H += (h * g**2).T @ h
        C += (target * g**2).T @ h
    H, C = reduce(H), reduce(C)
    H.diagonal().add_(COMPENSATION_DAMP * float(H.diagonal().mean()) + 1e-12)
    return torch.linalg.solve(H, C.T).T.float()  # C H^-1

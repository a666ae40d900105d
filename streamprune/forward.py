"""Streaming forward helpers shared by evaluation and pruning: embed, one block over all windows, head."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from streamprune.activations import Activations
from streamprune.arch import Role, Site
from streamprune.arch.block import Carried, Positions, Tap, Weights, block_forward, embed, expert_output, head, route
from streamprune.checkpoint import Checkpoint
from streamprune.stream import Part

EMBED_ROLES = {Role.TOKEN_EMBD, Role.POS_EMBD, Role.EMBD_NORM, Role.PROJ_IN}
HEAD_ROLES = {Role.OUTPUT_NORM, Role.PROJ_OUT, Role.OUTPUT}


def batches(n: int, batch: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch, n)) for i in range(0, n, batch)]


@torch.no_grad()
def embed_windows(ckpt: Checkpoint, windows: Tensor, device: torch.device, out: Activations, batch: int) -> None:
    """Hidden states entering block 0 for every window, written into `out` (K, T, D)."""
    g = ckpt.load_globals(device, torch.float32, EMBED_ROLES)
    for i, j in batches(windows.shape[0], batch):
        out.write(i, j, embed(ckpt.config, g, windows[i:j].to(device)))


# per batch of windows i..j-1: each token's chosen experts and their weights, tokens as rows of ((j - i) * T, D)
Routes = list[tuple[int, int, Tensor, Tensor]]


@torch.no_grad()
def forward_block(
    ckpt: Checkpoint,
    w: Weights,
    x: Activations,
    pos: Positions,
    out: Activations | None,
    batch: int,
    device: torch.device,
    tap: Tap | None = None,
    until: Site | None = None,
    experts: Callable[[], Iterable[Part]] | None = None,
    m_store: Activations | None = None,
    carry: Callable[[int, int], Carried] | None = None,
) -> Routes | None:
    """Run one block over all windows of `x` in batches, writing into `out` (may be `x` itself, except for an
    MoE block). With `until`, each batch stops once that site's input is tapped and nothing is written.

    An MoE block runs in two passes so that its routed experts are read once, one at a time: the first writes
    every window's output without the routed experts into `out` (if given) and the MoE input into `m_store`
    (default: over `x`, no longer needed), the second streams `experts()` (if given) and adds each one's weighted
    output for the tokens routed to it (see `add_expert`). Returns the routes of an MoE block's first pass
    (None for a dense block, or with `until`). `carry(i, j)`: what windows i..j-1 bring this block beside their hidden
    states (per-layer inputs, shared keys and values; see block.Carried), where the model has any.
    """
    moe = until is None and (Role.FFN_GATE_INP, "weight") in w
    m_store = x if m_store is None else m_store
    routes: Routes = []
    for i, j in batches(x.shape[0], batch):
        y = block_forward(ckpt.config, w, x.read(i, j, device), pos, tap, until,
                          routed=(lambda m, i=i, j=j: defer(ckpt, w, m_store, i, j, m, routes)) if moe else None,
                          carried=None if carry is None else carry(i, j))
        if y is not None and out is not None:
            assert out is not m_store or not moe
            out.write(i, j, y)
    if not moe:
        return None
    if experts is not None:
        assert out is not None, "an MoE block's experts add into its output buffer"
        for expert in experts():
            add_expert(ckpt, expert.w, routed_rows(routes, expert.xid), m_store, out, device)
    return routes


def defer(ckpt: Checkpoint, w: Weights, m_store: Activations, i: int, j: int, m: Tensor, routes: Routes) -> None:
    """First pass of an MoE block, windows i..j-1: route the MoE input `m` and keep it for the experts' pass."""
    routes.append((i, j, *route(ckpt.config, w, m.reshape(-1, m.shape[-1]))))
    m_store.write(i, j, m)


@torch.no_grad()
def route_all(ckpt: Checkpoint, w: Weights, m: Activations, batch: int, device: torch.device) -> Routes:
    """The routes of the MoE inputs `m` (K, T, D) by the router in `w`, in the batches of `forward_block`."""
    routes: Routes = []
    for i, j in batches(m.shape[0], batch):
        x = m.read(i, j, device)
        routes.append((i, j, *route(ckpt.config, w, x.reshape(-1, x.shape[-1]))))
    return routes


def routed_rows(routes: Routes, xid: int) -> Routes:
    """For each batch of windows: the token rows routed to expert `xid` and their routing weights."""
    rows = []
    for i, j, chosen, weights in routes:
        token, slot = torch.where(chosen == xid)
        rows.append((i, j, token, weights[token, slot]))
    return rows


@torch.no_grad()
def add_expert(ckpt: Checkpoint, we: Weights, rows: Routes, m: Activations, out: Activations,
               device: torch.device) -> None:
    """Add one routed expert's weighted output to `out` for its token rows (from `routed_rows`)."""
    for i, j, token, weight in rows:
        if token.numel():
            out.add_rows(i, j, token, expert_output(ckpt.config, we, m.rows(i, j, token, device), weight))


def head_weights(ckpt: Checkpoint, device: torch.device) -> Weights:
    roles = HEAD_ROLES | ({Role.TOKEN_EMBD} if ckpt.config.tie_word_embeddings else set())
    return ckpt.load_globals(device, torch.float32, roles)


@torch.no_grad()
def head_nll(ckpt: Checkpoint, x: Activations, windows: Tensor, device: torch.device) -> tuple[float, int]:
    """Summed next-token NLL over all windows and the number of predicted tokens."""
    g = head_weights(ckpt, device)
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        logits = head(ckpt.config, g, x.read(i, i + 1, device))[0]  # (T, vocab)
        target = windows[i, 1:].to(device)
        total += F.cross_entropy(logits[:-1], target, reduction="sum").item()
        count += target.numel()
    return total, count

"""Streaming forward helpers shared by evaluation and pruning: embed, one block over all windows, head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamprune.activations import Activations
from streamprune.arch import Role, Site
from streamprune.arch.block import Positions, Tap, Weights, block_forward, embed, head
from streamprune.checkpoint import Checkpoint

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
) -> None:
    """Run one block over all windows of `x` in batches, writing into `out` (may be `x` itself).

    With `until`, each batch stops once that site's input is tapped and nothing is written.
    """
    for i, j in batches(x.shape[0], batch):
        y = block_forward(ckpt.config, w, x.read(i, j, device), pos, tap, until)
        if y is not None:
            assert out is not None
            out.write(i, j, y)


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

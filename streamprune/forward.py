"""Streaming forward helpers shared by evaluation and pruning: embed, one block over all windows, head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamprune.arch import Role, Site
from streamprune.arch.block import Positions, Tap, Weights, block_forward, embed, head
from streamprune.checkpoint import Checkpoint

EMBED_ROLES = {Role.TOKEN_EMBD, Role.POS_EMBD, Role.EMBD_NORM, Role.PROJ_IN}
HEAD_ROLES = {Role.OUTPUT_NORM, Role.PROJ_OUT, Role.OUTPUT}


def embed_windows(ckpt: Checkpoint, windows: Tensor, device: torch.device, out: Tensor, batch: int) -> None:
    """Hidden states entering block 0 for every window, written into `out` (K, T, D)."""
    g = ckpt.load_globals(device, torch.float32, EMBED_ROLES)
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch].to(device)
        out[i : i + batch] = embed(ckpt.config, g, ids).to(out.device, out.dtype)


@torch.no_grad()
def forward_block(
    ckpt: Checkpoint,
    w: Weights,
    x: Tensor,
    pos: Positions,
    out: Tensor,
    batch: int,
    tap: Tap | None = None,
    device: torch.device | None = None,
    until: Site | None = None,
) -> None:
    """Run one block over all windows of `x` in batches, writing into `out` (may be `x` itself).

    With `until`, each batch stops once that site's input is tapped and nothing is written.
    """
    device = device or x.device
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].to(device, torch.float32)
        y = block_forward(ckpt.config, w, xb, pos, tap, until)
        if y is not None:
            out[i : i + batch] = y.to(out.device, out.dtype)


@torch.no_grad()
def head_nll(ckpt: Checkpoint, x: Tensor, windows: Tensor, device: torch.device) -> tuple[float, int]:
    """Summed next-token NLL over all windows and the number of predicted tokens."""
    roles = HEAD_ROLES | ({Role.TOKEN_EMBD} if ckpt.config.tie_word_embeddings else set())
    g = ckpt.load_globals(device, torch.float32, roles)
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        logits = head(ckpt.config, g, x[i : i + 1].to(device, torch.float32))[0]  # (T, vocab)
        target = windows[i, 1:].to(device)
        total += F.cross_entropy(logits[:-1].float(), target, reduction="sum").item()
        count += target.numel()
    return total, count


@torch.no_grad()
def head_logits(ckpt: Checkpoint, x: Tensor, device: torch.device) -> Tensor:
    roles = HEAD_ROLES | ({Role.TOKEN_EMBD} if ckpt.config.tie_word_embeddings else set())
    g = ckpt.load_globals(device, torch.float32, roles)
    return head(ckpt.config, g, x.to(device, torch.float32))

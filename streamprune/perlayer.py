"""Per-layer inputs (Gemma 4's edge models): each block adds a projection of inputs of its own, made from the token
ids and from the embedding that entered block 0.

Block b's inputs, per_layer_dim (P) wide, are (norm(E W_b / sqrt(D)) + table[ids, b] x sqrt(P)) / sqrt(2): E the
windows' embeddings (kept beside the hidden states for the whole run), W_b block b's rows of the model-wide
projection [L x P, D] (one contiguous byte range), table[ids, b] block b's columns of the table [V, L x P] for the
ids the windows hold (each id's cells read alone). So the table, the model's largest tensor on the E2B and E4B, is
never in memory: a block reads its own P columns of the ids in use, and the projection its own P rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamprune.activations import Activations
from streamprune.arch import Role
from streamprune.arch.layers import rms_norm
from streamprune.checkpoint import Checkpoint
from streamprune.tensorfile import read_cells, read_rows


class PerLayerInputs:
    """The per-layer inputs of token windows (K, T), block by block; `embeds` holds the windows' embeddings."""

    def __init__(self, ckpt: Checkpoint, windows: Tensor, embeds: Activations) -> None:
        self.ckpt, self.windows, self.embeds = ckpt, windows, embeds
        self.ids = torch.unique(windows)  # sorted: the table rows ever read
        self.block: tuple[int, BlockInputs] | None = None  # the last block's, read once for its forwards

    def of(self, bid: int, device: torch.device) -> BlockInputs:
        if self.block is None or self.block[0] != bid:
            self.block = None  # the previous block's tables go before this one's are read
            self.block = (bid, BlockInputs(self, bid, device))
        return self.block[1]

    def close(self) -> None:
        self.embeds.close()
        self.block = None


class BlockInputs:
    """Block `bid`'s slices of the projection and of the table; called with windows i..j-1, their inputs to it."""

    def __init__(self, source: PerLayerInputs, bid: int, device: torch.device) -> None:
        ckpt, cfg = source.ckpt, source.ckpt.config
        width = cfg.per_layer_dim
        table = ckpt.tensors[ckpt.names[((Role.PLE_EMBD, "weight"), None)]]
        projection = ckpt.tensors[ckpt.names[((Role.PLE_MODEL_PROJ, "weight"), None)]]
        self.source, self.device, self.cfg = source, device, cfg
        self.projection = read_rows(projection, bid * width, (bid + 1) * width).to(device, torch.float32)  # (P, D)
        cells = read_cells(table, source.ids, bid * width, width)  # (ids, P), as stored
        scale = torch.tensor(width ** 0.5, dtype=cells.dtype)  # rounded to the table's dtype, as the model does
        self.rows = (cells * scale).to(device, torch.float32)
        self.norm = ckpt.load_globals(device, torch.float32, {Role.PLE_PROJ_NORM})[(Role.PLE_PROJ_NORM, "weight")]

    def __call__(self, i: int, j: int) -> Tensor:
        cfg, source = self.cfg, self.source
        e = source.embeds.read(i, j, self.device)  # (B, T, D)
        projected = F.linear(e, self.projection) * cfg.hidden_size ** -0.5
        projected = rms_norm(projected, self.norm, cfg.norm_eps, cfg.norm_offset)
        ids = source.windows[i:j].to(source.ids.device)
        tokens = self.rows[torch.searchsorted(source.ids, ids).to(self.device)]  # (B, T, P)
        return (projected + tokens) * 2 ** -0.5

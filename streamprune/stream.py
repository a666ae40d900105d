"""The one block iterator: decoder blocks, one at a time, for pruning, for replay and for evaluation.

Each block's stored tensors are read by a background thread while the previous block is processed (read
ahead), checked for NaN and Inf, and put on the compute device in their stored dtype; the block forward
upcasts each linear exactly when it uses it. At most two blocks as stored are held: the one being processed
and the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from streamprune.arch import Param
from streamprune.checkpoint import Checkpoint, CheckpointError, TensorInfo, all_finite, read_header, read_tensor

Raw = dict[str, Tensor]  # stored tensors of one block, by checkpoint name, in their stored dtype


@dataclass
class Block:
    bid: int
    raw: Raw  # as stored, on the CPU
    w: dict[Param, Tensor]  # by role, on the compute device in the stored dtype (on the CPU: the same tensors)
    read_seconds: float  # how long the read took, in the background
    wait_seconds: float  # how long the consumer waited for it (the part of the read not hidden)


class BlockStream:
    """Blocks `bids` of `ckpt`, read ahead; `shard_of(bid)`, when given, names the file that holds block `bid`
    instead of the checkpoint's own shards (a resumed run replays the blocks it has written)."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, bids: range,
                 shard_of: Callable[[int], Path] | None = None) -> None:
        self.ckpt, self.device, self.bids, self.shard_of = ckpt, device, bids, shard_of

    def read(self, bid: int) -> tuple[Raw, float]:
        """Block `bid`'s stored tensors, checked for NaN/Inf, and the seconds the read took."""
        start = time.perf_counter()
        infos: dict[str, TensorInfo] = self.ckpt.tensors if self.shard_of is None else read_header(self.shard_of(bid))
        raw = {name: read_tensor(infos[name]) for name in self.ckpt.stored_names(bid)}
        for name, t in raw.items():
            if t.is_floating_point() and not all_finite(t):
                raise CheckpointError(f"{infos[name].path}: {name} (block {bid}) contains NaN or Inf")
        return raw, time.perf_counter() - start

    def __iter__(self) -> Iterator[Block]:
        bids = list(self.bids)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
            ahead = pool.submit(self.read, bids[0]) if bids else None
            for k, bid in enumerate(bids):
                assert ahead is not None
                start = time.perf_counter()
                raw, read_seconds = ahead.result()
                wait = time.perf_counter() - start
                ahead = pool.submit(self.read, bids[k + 1]) if k + 1 < len(bids) else None
                w = {param: raw[name].to(self.device) for (param, b), name in self.ckpt.names.items() if b == bid}
                yield Block(bid, raw, w, read_seconds, wait)
                del raw, w

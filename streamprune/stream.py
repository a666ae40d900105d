"""The one block iterator: decoder blocks, one at a time, for pruning, for replay and for evaluation.

Each block's stored tensors are read by a background thread while the previous block is processed (read
ahead), checked for NaN and Inf, and put on the compute device in their stored dtype; the block forward
upcasts each linear exactly when it uses it. At most two blocks as stored are held: the one being processed
and the next one. A block's routed experts are not part of it: `Part.experts()` streams them the same way,
one expert at a time with the next one read ahead, so no more than two experts of a block are ever held.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import Tensor

from streamprune.arch import Param
from streamprune.checkpoint import Checkpoint
from streamprune.errors import CheckpointError
from streamprune.formats import Layout
from streamprune.tensorfile import TensorInfo, all_finite, lookup, read_header, read_tensor

Raw = dict[str, Tensor]  # stored tensors of one block, by checkpoint name, in their stored dtype
K = TypeVar("K")


@dataclass
class Part:
    """A block, or one routed expert of a block, as read."""

    bid: int
    raw: Raw  # as stored, on the CPU
    w: dict[Param, Tensor]  # by role, on the compute device in the stored dtype (on the CPU: the same tensors)
    read_seconds: float  # how long the read took, in the background
    wait_seconds: float  # how long the consumer waited for it (the part of the read not hidden)
    xid: int | None = None  # the expert's index; None for the block itself
    experts: Callable[[], Iterator[Part]] = field(default=lambda: iter(()), repr=False)



class Reader(Generic[K]):
    """Reads the parts named by `keys` in order, each while the one before it is processed."""

    def __init__(self, keys: list[K], read: Callable[[K], tuple[Raw, float]], make: Callable[[K, Raw, float, float], Part]):
        self.keys, self.read, self.make = keys, read, make

    def __iter__(self) -> Iterator[Part]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
            ahead = pool.submit(self.read, self.keys[0]) if self.keys else None
            for k, key in enumerate(self.keys):
                assert ahead is not None
                start = time.perf_counter()
                raw, read_seconds = ahead.result()
                wait = time.perf_counter() - start
                ahead = pool.submit(self.read, self.keys[k + 1]) if k + 1 < len(self.keys) else None
                yield self.make(key, raw, read_seconds, wait)
                del raw


class BlockStream:
    """Blocks `bids` of `ckpt`, read ahead; `shard_of(bid)`, when given, names the file that holds block `bid`
    instead of the checkpoint's own shards (a resumed run replays the blocks it has written), stored in `layout`
    (the run's output layout; default: the checkpoint's own). Each linear is decoded by the layout's format."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, bids: range,
                 shard_of: Callable[[int], Path] | None = None, layout: Layout | None = None) -> None:
        self.ckpt, self.device, self.bids, self.shard_of = ckpt, device, bids, shard_of
        self.layout = ckpt.layout if layout is None else layout

    def stored(self, names: list[str]) -> list[str]:
        """The stored tensors that hold the checkpoint's tensors `names` in this stream's layout (the checkpoint's
        own stored names are their own: a run's output layout encodes the dense names of its input)."""
        return sorted({s for name in names for s in self.layout.stored(name)})

    def weight(self, name: str, raw: Raw) -> Tensor:
        if name in self.layout.encoded:  # decoded where it is used (on a GPU, not by the host's cores)
            raw = {part: raw[part].to(self.device) for part in self.layout.stored(name)}
        return self.layout.weight(name, raw).to(self.device)

    def infos(self, bid: int) -> dict[str, TensorInfo]:
        return self.ckpt.tensors if self.shard_of is None else read_header(self.shard_of(bid))

    def read(self, bid: int, names: list[str]) -> tuple[Raw, float]:
        """Tensors `names` of block `bid` as stored, checked for NaN/Inf, and the seconds the read took."""
        start = time.perf_counter()
        infos = self.infos(bid)
        raw = {name: read_tensor(lookup(infos, name)) for name in names}
        for name, t in raw.items():
            if t.is_floating_point() and not all_finite(t):
                raise CheckpointError(f"{lookup(infos, name).path}: {name} (block {bid}) contains NaN or Inf")
        return raw, time.perf_counter() - start

    def experts(self, bid: int) -> Iterator[Part]:
        """Block `bid`'s routed experts, one at a time, the next one read ahead."""
        names = {xid: self.ckpt.experts[(bid, xid)] for xid in range(self.ckpt.n_experts(bid))}

        def make(xid: int, raw: Raw, read_seconds: float, wait: float) -> Part:
            w = {param: self.weight(name, raw) for param, name in names[xid].items()}
            return Part(bid, raw, w, read_seconds, wait, xid)

        return iter(Reader(list(names), lambda xid: self.read(bid, self.stored(list(names[xid].values()))), make))

    def __iter__(self) -> Iterator[Part]:
        def make(bid: int, raw: Raw, read_seconds: float, wait: float) -> Part:
            w = {param: self.weight(name, raw) for (param, b), name in self.ckpt.names.items() if b == bid}
            return Part(bid, raw, w, read_seconds, wait, experts=lambda: self.experts(bid))

        return iter(Reader(list(self.bids), lambda bid: self.read(bid, self.stored(self.ckpt.block_names(bid))), make))

"""Where the calibration hidden states live: on the compute device, in host memory, or on disk.

Each store holds (windows, seqlen, hidden) float32 activations and is read and written in
batches of windows. The disk store uses positioned reads and writes (no memory map), so its
contents never count toward the process's resident memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from streamprune.fileio import read_fully, write_fully
from streamprune.errors import ArgumentError, StreamPruneError

PLACEMENTS = ("auto", "device", "cpu", "disk")


class Activations:
    """A (N, T, D) float32 buffer in memory (device or host)."""

    def __init__(self, shape: tuple[int, int, int], where: torch.device, pin: bool = False) -> None:
        self.shape = shape
        self.data = torch.empty(shape, device=where, pin_memory=pin and where.type == "cpu")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4

    def read(self, i: int, j: int, device: torch.device) -> Tensor:
        return self.data[i:j].to(device, non_blocking=True)

    def write(self, i: int, j: int, value: Tensor) -> None:
        self.data[i:j] = value.to(self.data.device)

    def rows(self, i: int, j: int, index: Tensor, device: torch.device) -> Tensor:
        """Rows `index` of windows i..j-1 seen as ((j - i) * T, D) token rows: only those rows are moved."""
        return self.data[i:j].view(-1, self.shape[2])[index.to(self.data.device)].to(device, non_blocking=True)

    def add_rows(self, i: int, j: int, index: Tensor, values: Tensor) -> None:
        """Add `values` (len(index), D) to token rows `index` of windows i..j-1."""
        self.data[i:j].view(-1, self.shape[2]).index_add_(0, index.to(self.data.device), values.to(self.data.device))

    def like(self, suffix: str, width: int | None = None) -> Activations:
        """An empty buffer of this one's shape (or `width` features per token) and placement (`suffix` names its file,
        on disk)."""
        shape = self.shape if width is None else (*self.shape[:2], width)
        return Activations(shape, self.data.device, pin=self.data.is_pinned())

    def close(self) -> None:
        self.data = torch.empty(0)


class DiskActivations(Activations):
    """A (N, T, D) float32 buffer in a file, read and written window by window."""

    def __init__(self, shape: tuple[int, int, int], path: Path) -> None:
        self.shape = shape
        self.path = path
        self.row_bytes = shape[1] * shape[2] * 4
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, shape[0] * self.row_bytes)
        self.read_bytes = self.written_bytes = 0  # moved through the file so far

    def read(self, i: int, j: int, device: torch.device) -> Tensor:
        buf = np.empty((j - i, *self.shape[1:]), dtype=np.float32)
        got = read_fully(self.fd, memoryview(buf).cast("B"), i * self.row_bytes)
        self.read_bytes += got
        if got != buf.nbytes:  # the file was cut short behind the run's back
            raise StreamPruneError(f"{self.path}: activation file ends after {got} of {buf.nbytes} bytes of windows {i}..{j - 1}")
        return torch.from_numpy(buf).to(device)

    def runs(self, i: int, index: Tensor) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
        """The distinct token rows `index` of windows from i on (sorted), where each of `index` is among them, and the
        runs of consecutive rows they make: (first, end) in that list and the file offset of the first."""
        rows, where = np.unique(index.cpu().numpy(), return_inverse=True)
        starts = np.flatnonzero(np.r_[True, np.diff(rows) != 1]) if rows.size else np.empty(0, dtype=np.int64)
        ends = np.r_[starts[1:], rows.size]
        width = self.shape[2] * 4
        return rows, where, [(int(a), int(b), (i * self.shape[1] + int(rows[a])) * width) for a, b in zip(starts, ends)]

    def rows(self, i: int, j: int, index: Tensor, device: torch.device) -> Tensor:
        """Only the rows asked for are read (a routed expert's tokens: a few percent of a block's), a run of
        consecutive rows at a time."""
        rows, where, runs = self.runs(i, index)
        buf = np.empty((rows.size, self.shape[2]), dtype=np.float32)
        for a, b, offset in runs:
            self.read_into(buf[a:b], offset)
        return torch.from_numpy(buf[where]).to(device)

    def add_rows(self, i: int, j: int, index: Tensor, values: Tensor) -> None:
        rows, where, runs = self.runs(i, index)
        buf = np.empty((rows.size, self.shape[2]), dtype=np.float32)
        for a, b, offset in runs:
            self.read_into(buf[a:b], offset)
        added = torch.from_numpy(buf)
        added.index_add_(0, torch.from_numpy(where).reshape(-1), values.to("cpu", torch.float32))
        for a, b, offset in runs:
            write_fully(self.fd, memoryview(buf[a:b]).cast("B"), offset)
        self.written_bytes += buf.nbytes

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        got = read_fully(self.fd, memoryview(buf).cast("B"), offset)
        self.read_bytes += got
        if got != buf.nbytes:  # the file was cut short behind the run's back
            raise StreamPruneError(f"{self.path}: activation file ends after {got} of {buf.nbytes} bytes at {offset}")

    def write(self, i: int, j: int, value: Tensor) -> None:
        arr = value.detach().to("cpu", torch.float32).contiguous().numpy()
        write_fully(self.fd, memoryview(arr).cast("B"), i * self.row_bytes)
        self.written_bytes += arr.nbytes

    def like(self, suffix: str, width: int | None = None) -> Activations:
        shape = self.shape if width is None else (*self.shape[:2], width)
        return DiskActivations(shape, self.path.with_name(self.path.stem + suffix + self.path.suffix))

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def choose_placement(placement: str, nbytes_pair: int, device: torch.device, device_budget: int | None,
                     host_budget: int) -> str:
    """Resolve 'auto': the device if both buffers fit its budget, else host memory, else disk."""
    if placement not in PLACEMENTS:
        raise ArgumentError(f"offload-activations {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement == "device" and device.type == "cpu":
        return "cpu"  # the compute device is host memory
    if placement != "auto":
        return placement
    if device.type == "cuda" and device_budget is not None and nbytes_pair <= device_budget:
        return "device"
    return "cpu" if nbytes_pair <= host_budget else "disk"


def copy_store(src: Activations, dst: Activations, batch: int) -> None:
    """Copy every window of `src` into `dst` (same shape), `batch` windows at a time."""
    for i in range(0, src.shape[0], batch):
        j = min(i + batch, src.shape[0])
        dst.write(i, j, src.read(i, j, torch.device("cpu")))


def save_store(store: Activations, path: Path, batch: int) -> None:
    """Write a store's windows to `path` (raw float32, window after window) and flush it to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        row_bytes = store.shape[1] * store.shape[2] * 4
        for i in range(0, store.shape[0], batch):
            j = min(i + batch, store.shape[0])
            view = memoryview(store.read(i, j, torch.device("cpu")).contiguous().numpy()).cast("B")
            write_fully(fd, view, i * row_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_store(store: Activations, path: Path, batch: int) -> None:
    """Fill a store from a file written by `save_store`; a file of another size is refused."""
    row_bytes = store.shape[1] * store.shape[2] * 4
    if not path.is_file() or path.stat().st_size != store.shape[0] * row_bytes:
        raise StreamPruneError(f"{path}: saved activations missing or of the wrong size; rerun with --restart")
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(0, store.shape[0], batch):
            j = min(i + batch, store.shape[0])
            buf = np.empty((j - i, *store.shape[1:]), dtype=np.float32)
            if read_fully(fd, memoryview(buf).cast("B"), i * row_bytes) != buf.nbytes:
                raise StreamPruneError(f"{path}: saved activations end early; rerun with --restart")
            store.write(i, j, torch.from_numpy(buf))
    finally:
        os.close(fd)


def make_store(shape: tuple[int, int, int], placement: str, device: torch.device, workdir: Path,
               name: str) -> Activations:
    if placement == "disk":
        return DiskActivations(shape, workdir / f"{name}.f32")
    if placement == "cpu":
        return Activations(shape, torch.device("cpu"), pin=device.type == "cuda")
    return Activations(shape, device)

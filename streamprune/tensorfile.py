"""One safetensors file: its header read and checked, a tensor read, a file written tensor by tensor.

A tensor is read with a positioned read into a fresh buffer (no memory map, so nothing stays resident once it is
freed). A file is written with its header first (names, dtypes and shapes are known before the data) and each
tensor at its own offset as soon as it is ready.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamprune.errors import CheckpointError
from streamprune.fileio import read_fully, write_fully

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # power-of-two scales (DeepSeek-V3.1's ue8m0)
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
Meta = tuple[torch.dtype, tuple[int, ...]]  # a stored tensor's dtype and shape
SLICE = re.compile(r"(.+)\[(\d+)\]")  # `NAME[i]`: slice i of tensor NAME along its first dimension


def slice_name(tensor: str, index: int) -> str:
    """The name of slice `index` (along the first dimension) of stored tensor `tensor`."""
    return f"{tensor}[{index}]"


def parse_slice(name: str) -> tuple[str, int] | None:
    """(tensor, index) of a slice's name; None for a whole tensor's."""
    m = SLICE.fullmatch(name)
    return None if m is None else (m.group(1), int(m.group(2)))


def lookup(infos: Mapping[str, TensorInfo], name: str) -> TensorInfo:
    """Where stored tensor `name` lies, or a slice `NAME[i]` of one (its own contiguous byte range)."""
    if name in infos:
        return infos[name]
    parsed = parse_slice(name)
    if parsed is None or parsed[0] not in infos:
        raise KeyError(name)
    return infos[parsed[0]].slice(parsed[1])


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: file, dtype, shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def keeping(self, rows: int, axis: int = 0) -> TensorInfo:
        """This tensor cut to its first `rows` entries along `axis`, the first one or (the dimensions before it all
        of size 1) the last: a router's rows, fused experts' slices, a (1, n) selection bias."""
        axis = axis % len(self.shape)
        assert all(d == 1 for d in self.shape[:axis]), (self.name, self.shape, axis)
        shape = (*self.shape[:axis], rows, *self.shape[axis + 1:])
        return dataclasses.replace(self, shape=shape, end=self.start + self.nbytes // self.shape[axis] * rows)

    def slice(self, index: int) -> TensorInfo:
        """Slice `index` of this tensor along its first dimension."""
        if not 0 <= index < self.shape[0]:
            raise KeyError(f"{self.name}[{index}]: index out of 0..{self.shape[0] - 1}")
        size = self.nbytes // self.shape[0]
        return dataclasses.replace(self, name=slice_name(self.name, index), shape=self.shape[1:],
                                   start=self.start + index * size, end=self.start + (index + 1) * size)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading any tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: header length {n} is impossible for a file of {size} bytes "
                    f"(limit {MAX_HEADER_BYTES})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(path, name, meta, data_start, size)
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file")
    return infos


def _tensor_info(path: Path, name: str, meta: Any, data_start: int, size: int) -> TensorInfo:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    expected = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} of {dtype} "
            f"needs {expected}"
        )
    start, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise CheckpointError(
            f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes"
        )
    return TensorInfo(name, path, dtype, tuple(shape), start, end)


def read_tensor(info: TensorInfo) -> Tensor:
    """Read one tensor into a fresh CPU buffer (no memory map: nothing stays resident once it is freed)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        got = read_fully(fd, memoryview(buf.numpy()), info.start)
    except OSError as e:
        raise CheckpointError(f"{info.path}: cannot read {info.name!r}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if got != info.nbytes:
        raise CheckpointError(f"{info.path}: truncated while reading {info.name!r} ({got} of {info.nbytes} bytes)")
    return buf.view(info.torch_dtype).reshape(info.shape)


def read_rows(info: TensorInfo, start: int, stop: int) -> Tensor:
    """Rows start..stop-1 of a stored tensor (one contiguous byte range), alone."""
    size = info.nbytes // info.shape[0]
    return read_tensor(dataclasses.replace(info, shape=(stop - start, *info.shape[1:]), start=info.start + start * size,
                                           end=info.start + stop * size))


def read_cells(info: TensorInfo, rows: Tensor, column: int, width: int) -> Tensor:
    """Columns column..column+width-1 of rows `rows` of a stored 2-D tensor, (len(rows), width): each row's cells read
    alone, so a column slice of a large table costs its own bytes, never the table's."""
    item = info.torch_dtype.itemsize
    buf = torch.empty((len(rows), width * item), dtype=torch.uint8)
    view = buf.numpy()
    fd = os.open(info.path, os.O_RDONLY)
    try:
        for k, row in enumerate(rows.tolist()):
            offset = info.start + (row * info.shape[1] + column) * item
            if read_fully(fd, memoryview(view[k]), offset) != width * item:
                raise CheckpointError(f"{info.path}: truncated while reading {info.name!r} row {row}")
    except OSError as e:
        raise CheckpointError(f"{info.path}: cannot read {info.name!r}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return buf.view(info.torch_dtype)


def all_finite(t: Tensor, chunk_bytes: int = 16 * 2**20) -> bool:
    """No NaN or Inf in `t`, checked in slices so the temporaries stay small beside a large tensor."""
    flat = t.reshape(-1)
    step = max(1, chunk_bytes // t.element_size())
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no isfinite of their own; exact in float32
        return all(bool(torch.isfinite(flat[i : i + step].float()).all()) for i in range(0, flat.numel(), step))
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))



def safetensors_header(tensors: dict[str, Meta]) -> tuple[bytes, int]:
    """The header block of a safetensors file holding these tensors in name order (length prefix
    included), and the bytes of data that follow it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in sorted(tensors.items()):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offset


class ShardFile:
    """A safetensors file whose header is known before its data (names, dtypes and shapes): the header is
    written first and each tensor at its own offset, in any order, as soon as it is ready, so a block's
    pruned experts never wait in memory for each other. `close` checks that every tensor was written."""

    def __init__(self, path: Path, meta: dict[str, Meta]) -> None:
        self.path, self.meta = path, meta
        header, size = safetensors_header(meta)
        self.offsets: dict[str, int] = {}
        offset = len(header)
        for name, (dtype, shape) in sorted(meta.items()):  # the header's own order
            self.offsets[name] = offset
            offset += math.prod(shape) * dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.written: set[str] = set()
        self.rows_written: dict[str, int] = {}  # rows of a tensor written a slice at a time (put_rows)
        try:
            os.ftruncate(self.fd, len(header) + size)
            write_fully(self.fd, memoryview(header), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def put(self, name: str, t: Tensor) -> None:
        """Tensor `name`, or a slice of one (`NAME[i]`), written at its place."""
        tensor, index = parse_slice(name) or (name, None)
        if tensor not in self.meta:
            raise CheckpointError(f"{self.path}: {name} is not one of the tensors of this file")
        dtype, shape = self.meta[tensor]
        offset = self.offsets[tensor]
        if index is not None:
            offset += index * math.prod(shape[1:]) * dtype.itemsize
            shape = shape[1:] if 0 <= index < shape[0] else ()
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: {name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        # flattened before the byte view: a contiguous tensor with a size-1 dimension may keep an odd stride there
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        write_fully(self.fd, memoryview(data), offset)
        self.written.add(name)

    def put_rows(self, name: str, start: int, t: Tensor) -> None:
        """Rows start..start+len(t)-1 of tensor `name`, written at their place (a large tensor a slice at a time);
        it is complete once every row was."""
        dtype, shape = self.meta[name]
        if t.dtype != dtype or tuple(t.shape[1:]) != tuple(shape[1:]) or not 0 <= start <= start + len(t) <= shape[0]:
            raise CheckpointError(f"{self.path}: rows {start}.. of {name} are {t.dtype} {list(t.shape)}, expected "
                                  f"{dtype} rows of {list(shape)}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        write_fully(self.fd, memoryview(data), self.offsets[name] + start * math.prod(shape[1:]) * dtype.itemsize)
        self.rows_written[name] = self.rows_written.get(name, 0) + len(t)

    def complete(self, name: str) -> bool:
        dtype, shape = self.meta[name]
        return (name in self.written or (len(shape) > 0 and self.rows_written.get(name) == shape[0])
                or (len(shape) > 0 and all(slice_name(name, i) in self.written for i in range(shape[0]))))

    def close(self) -> None:
        missing = sorted(n for n in self.meta if not self.complete(n))
        try:
            if missing:
                raise CheckpointError(f"{self.path}: {len(missing)} tensor(s) were never written, e.g. {missing[0]}")
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            if exc[0] is None:
                self.close()
            else:
                os.close(self.fd)
                self.fd = -1


Lazy = dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], Tensor]]]  # name -> dtype, shape, loader


def write_safetensors(path: Path, tensors: Lazy) -> None:
    """Write a safetensors file tensor by tensor: each loader is called just before its data is written,
    so at most one tensor's bytes are held at a time (safetensors' own save builds the whole file in memory)."""
    with ShardFile(path, {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}) as f:
        for name, (_, _, load) in sorted(tensors.items()):
            f.put(name, load())

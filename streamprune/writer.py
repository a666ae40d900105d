"""Writing an output checkpoint: one shard per decoder block (plus one for the tensors outside the blocks), each
written tensor by tensor under a temporary name and put in place whole; the index last, so that OUT_DIR loads as a
checkpoint only once every shard is there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from streamprune.checkpoint import INDEX_NAME
from streamprune.errors import CheckpointError
from streamprune.fileio import atomic_write
from streamprune.tensorfile import Meta, ShardFile, read_header

Lazy = dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], Tensor]]]  # name -> dtype, shape, loader


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files unchanged; return their names."""
    weight_suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.endswith(weight_suffixes) or path.name.endswith(".index.json"):
            continue
        shutil.copyfile(path, dst / path.name)
        copied.append(path.name)
    return copied


def write_safetensors(path: Path, tensors: Lazy) -> None:
    """Write a safetensors file tensor by tensor: each loader is called just before its data is written,
    so at most one tensor's bytes are held at a time (safetensors' own save builds the whole file in memory)."""
    with ShardFile(path, {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}) as f:
        for name, (_, _, load) in sorted(tensors.items()):
            f.put(name, load())


def eager(tensors: dict[str, Tensor]) -> Lazy:
    """Entries for `write_safetensors` from tensors already in memory."""
    return {name: (t.dtype, tuple(t.shape), (lambda t=t: t)) for name, t in tensors.items()}


class ShardWriter:
    """Writes an output checkpoint shard by shard; `finish` writes the index from the shards' headers."""

    def __init__(self, out_dir: Path, n_shards: int) -> None:
        self.dir = out_dir
        self.n_shards = n_shards

    def shard_name(self, idx: int) -> str:
        return f"model-{idx + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, idx: int, tensors: Lazy) -> Path:
        """Write shard `idx` (entries as for `write_safetensors`) under a temporary name, flush it,
        rename it into place and check its header."""
        with self.open(idx, {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}) as shard:
            for name, (_, _, load) in sorted(tensors.items()):
                shard.put(name, load())
        return self.dir / self.shard_name(idx)

    @contextlib.contextmanager
    def open(self, idx: int, meta: dict[str, Meta]) -> Iterator[ShardFile]:
        """Shard `idx` under a temporary name, its tensors put as they are ready; on leaving the block it is flushed,
        renamed into place and its header checked (on an error, the temporary file is removed)."""
        final = self.dir / self.shard_name(idx)
        try:
            with atomic_write(final) as tmp, ShardFile(tmp, meta) as shard:
                yield shard
        except OSError as e:
            raise CheckpointError(
                f"{final}: write failed ({e.strerror or e}); OUT_DIR stays resumable: fix the cause and rerun "
                "the same command"
            ) from e
        if set(read_header(final)) != set(meta):
            raise CheckpointError(f"{final}: written shard does not hold the expected tensors")

    def finish(self) -> None:
        """Write model.safetensors.index.json; until then OUT_DIR does not load as a checkpoint."""
        weight_map: dict[str, str] = {}
        total = 0
        for idx in range(self.n_shards):
            for name, info in read_header(self.dir / self.shard_name(idx)).items():
                weight_map[name] = info.path.name
                total += info.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with atomic_write(self.dir / INDEX_NAME) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")

"""Writing an output checkpoint: one shard per decoder block (plus one for the tensors outside the blocks), each
written tensor by tensor under a temporary name and put in place whole; the index last, so that OUT_DIR loads as a
checkpoint only once every shard is there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from streamprune.arch import PRUNABLE
from streamprune.checkpoint import INDEX_NAME, Checkpoint
from streamprune.errors import CheckpointError
from streamprune.fileio import atomic_write
from streamprune.formats import Layout, update_config, write_quantization_config
from streamprune.journal import Journal
from streamprune.report import LayerReport
from streamprune.tensorfile import Meta, ShardFile, read_header, read_rows, read_tensor

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


class ShardWriter:
    """Writes an output checkpoint shard by shard; `finish` writes the index from the shards' headers."""

    def __init__(self, out_dir: Path, n_shards: int) -> None:
        self.dir = out_dir
        self.n_shards = n_shards

    def shard_name(self, idx: int) -> str:
        return f"model-{idx + 1:05d}-of-{self.n_shards:05d}.safetensors"

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


def output_linears(ckpt: Checkpoint) -> list[str]:
    """The weights a run prunes, so writes through its output format: every linear of SEQUENTIAL and
    EXPERT_SEQUENTIAL."""
    names = [name for ((role, kind), bid), name in ckpt.names.items()
             if bid is not None and kind == "weight" and role in PRUNABLE]
    return names + [name for names in ckpt.experts.values() for (role, kind), name in names.items()
                    if role in PRUNABLE and kind == "weight"]


def block_meta(ckpt: Checkpoint, bid: int | None, layout: Layout) -> dict[str, Meta]:
    """The stored tensors of block `bid`'s output shard (None: the globals'), with dtypes and shapes: the input's
    tensors, the linears in `layout.encoded` as its format stores them. Known before any is solved."""
    meta: dict[str, Meta] = {}
    for n in ckpt.stored_names(bid):
        info = ckpt.info(n)
        meta.update(layout.meta(n, info.torch_dtype, info.shape))
    return meta


class BlockShard:
    """One shard being written: tensors put as they are final, in any order; `close` puts it in place whole (and
    hands its layers' report rows to `on_close`), `abort` removes it. Over a context that yields no file, it keeps
    nothing. A routed expert's linear stored fused (in `layout.fused`) waits for the others of its expert's slice,
    which is then written whole (an expert's gate and up are solved together, its down alone)."""

    def __init__(self, context: contextlib.AbstractContextManager[ShardFile | None],
                 on_close: Callable[[list[LayerReport], dict[str, Any] | None], None] = lambda layers, experts: None,
                 layout: Layout | None = None) -> None:
        self.context, self.on_close, self.layout = context, on_close, layout
        self.pending: dict[str, Tensor] = {}
        self.file = context.__enter__()

    @property
    def path(self) -> Path | None:
        return None if self.file is None else self.file.path

    def put(self, name: str, tensor: Tensor) -> None:
        if self.layout is None or name not in self.layout.fused:
            self.write(name, tensor)
            return
        self.pending[name] = tensor
        for part, value in self.layout.assemble(self.pending).items():
            self.write(part, value)

    def write(self, name: str, tensor: Tensor) -> None:
        if self.file is not None:
            self.file.put(name, tensor)

    def put_rows(self, name: str, start: int, rows: Tensor) -> None:
        """Rows of a tensor written a slice at a time (ShardFile.put_rows)."""
        if self.file is not None:
            self.file.put_rows(name, start, rows)

    def close(self, layers: list[LayerReport], experts: dict[str, Any] | None = None) -> None:
        """Put the shard in place; `layers` and `experts` (the block's choice of routed experts, if any) are its
        report's."""
        if self.pending:
            raise CheckpointError(f"{sorted(self.pending)[0]}: written without the rest of its expert's slice")
        self.context.__exit__(None, None, None)
        self.on_close(layers, experts)

    def abort(self) -> None:
        error = CheckpointError("the block was not finished")
        self.context.__exit__(type(error), error, None)


class Sink(Protocol):
    def open(self, idx: int, meta: dict[str, Meta], read_back: bool = False,
             layout: Layout | None = None) -> BlockShard:
        """Shard `idx` of the output (0: the tensors outside the blocks; b + 1: block b), holding `meta`;
        `read_back`: its file is read back before it is closed (the pruned experts of a block); `layout`: the
        output's, where it stores routed experts fused (see `BlockShard`)."""

    def finish(self) -> None:
        """Complete the output once every shard is in place."""


class CheckpointSink:
    """An output checkpoint of structure `ckpt` (see `Checkpoint.keeping_experts`) in `out_dir`: each shard put in
    place whole, then recorded in `journal` (if any) with its layers' report rows; `finish` adds the side files,
    config.json and the index."""

    def __init__(self, ckpt: Checkpoint, out_dir: Path, layout: Layout, journal: Journal | None = None) -> None:
        self.ckpt, self.dir, self.layout, self.journal = ckpt, out_dir, layout, journal
        self.writer = ShardWriter(out_dir, ckpt.config.n_layers + 1)

    def open(self, idx: int, meta: dict[str, Meta], read_back: bool = False,
             layout: Layout | None = None) -> BlockShard:
        return BlockShard(self.writer.open(idx, meta), lambda layers, experts: self.record(idx, layers, experts),
                          layout)

    def record(self, idx: int, layers: list[LayerReport], experts: dict[str, Any] | None = None) -> None:
        """Shard `idx`, written, flushed, renamed into place and checked, in the journal."""
        if self.journal is None:
            return
        path = self.dir / self.writer.shard_name(idx)
        self.journal.done[idx] = {"shard": path.name, "bytes": path.stat().st_size, "tensors": sorted(read_header(path)),
                                  "layers": [asdict(lr) for lr in layers]}
        if experts is not None:
            self.journal.done[idx]["experts"] = experts
        self.journal.save(self.dir)

    def finish(self) -> None:
        """The input's side files and config.json (with the format's quantization config, whose `ignore` lists every
        linear module the output does not encode, the head among them), then the index: until now OUT_DIR does not
        load as a checkpoint."""
        copy_side_files(self.ckpt.dir, self.dir)
        given = json.loads((self.ckpt.dir / "config.json").read_text(encoding="utf-8"))
        update_config(self.dir, {k: v for k, v in self.ckpt.raw_config.items() if given.get(k) != v})
        if self.layout.format != self.ckpt.layout.format or not self.ckpt.layout.encoded:  # else: the input's stays
            update_config(self.dir, {}, remove=["quantization_config"])  # (an fp8 input written in another format)
            ignore = [m for m in self.ckpt.linear_modules() if m + ".weight" not in self.layout.encoded]
            write_quantization_config(self.dir, self.layout.format, ignore)
        self.writer.finish()


class NoSink:
    """An output that keeps nothing (a rank other than rank 0; a sweep's point without --save-dir); a shard read back
    before it is closed is a temporary file `work`/`name`, removed when it is closed."""

    def __init__(self, work: Path | None = None, name: str = "block") -> None:
        self.work, self.name = work, name

    def open(self, idx: int, meta: dict[str, Meta], read_back: bool = False,
             layout: Layout | None = None) -> BlockShard:
        if read_back:
            assert self.work is not None
            return BlockShard(temporary_shard(self.work / f"{self.name}.safetensors", meta), layout=layout)
        return BlockShard(contextlib.nullcontext(None), layout=layout)

    def finish(self) -> None:
        pass


@contextlib.contextmanager
def temporary_shard(path: Path, meta: dict[str, Meta]) -> Iterator[ShardFile]:
    try:
        with ShardFile(path, meta) as shard:
            yield shard
    finally:
        path.unlink(missing_ok=True)


GLOBAL_CHUNK_BYTES = 16 * 2**20  # a larger tensor outside the blocks is copied this much at a time


def write_globals(ckpt: Checkpoint, sinks: list[Sink]) -> None:
    """Shard 0 of each sink's output: the tensors outside the blocks, copied bit for bit, each read once and one at
    a time; one larger than GLOBAL_CHUNK_BYTES (Gemma 4's table of per-layer inputs) a slice of its rows at a time."""
    names = ckpt.stored_names(None)
    meta = {n: (ckpt.tensors[n].torch_dtype, tuple(ckpt.tensors[n].shape)) for n in names}
    shards = [sink.open(0, meta) for sink in sinks]
    try:
        for name in sorted(names):
            info = ckpt.tensors[name]
            if not info.shape or info.nbytes <= GLOBAL_CHUNK_BYTES:
                tensor = read_tensor(info)
                for shard in shards:
                    shard.put(name, tensor)
                continue
            step = max(1, GLOBAL_CHUNK_BYTES // (info.nbytes // info.shape[0]))  # rows at a time
            for start in range(0, info.shape[0], step):
                rows = read_rows(info, start, min(start + step, info.shape[0]))
                for shard in shards:
                    shard.put_rows(name, start, rows)
    except BaseException:
        for shard in shards:
            shard.abort()
        raise
    for shard in shards:
        shard.close([])

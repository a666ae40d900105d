"""Reading Hugging Face safetensors checkpoints one tensor at a time, and writing them back.

Nothing here builds a state dict: the reader validates every header up front, then reads each
tensor with a positioned read into a fresh buffer when its block is processed (no memory map,
so no file-backed pages stay resident once a block is done). The writer emits one shard per
decoder block, each under a temporary name renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamprune.arch import ArchSpec, ModelConfig, Param, Role, expected_params, expert_params, resolve
from streamprune.arch.roles import BLOCK_ROLES, PRUNABLE
from streamprune.errors import ArgumentError, CheckpointError
from streamprune.fileio import atomic_write, read_fully, write_fully
from streamprune.formats import Layout, format_of

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
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
}
FLOAT_DTYPES = ("F32", "F16", "BF16")


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


def load_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.exists():
        raise CheckpointError(f"model directory {str(model_dir)!r} does not exist")
    if not model_dir.is_dir():
        raise CheckpointError(f"{str(model_dir)!r} is not a directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a Hugging Face model directory needs config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def scan_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint, located, with every shard's header checked.

    Shards may be symlinks (the Hugging Face cache links `snapshots/<rev>/*.safetensors` to `../../blobs/`):
    the input is only read, so any link to a regular file is followed."""
    index_path = model_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index_path}: not a valid index: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: not a valid index: needs a 'weight_map' object, got {weight_map!r:.80}")
        bad = [s for s in weight_map.values() if not isinstance(s, str) or Path(s).name != s or s == ".."]
        if bad:
            raise CheckpointError(f"{index_path}: shard {bad[0]!r} is not a file name inside the model directory")
        shard_names = sorted(set(weight_map.values()))
    else:
        weight_map = {}
        shard_names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not shard_names:
            raise CheckpointError(f"{model_dir}: no {SINGLE_NAME}, no {INDEX_NAME} and no *.safetensors file")
    missing = [s for s in shard_names if not (model_dir / s).exists()]
    if missing:
        where = f"{index_path}: names shard files" if weight_map else f"{model_dir}: holds broken symlinks to shard files"
        raise CheckpointError(f"{where} that do not exist: {', '.join(missing)}")
    odd = [s for s in shard_names if not (model_dir / s).is_file()]
    if odd:
        raise CheckpointError(f"{model_dir / odd[0]}: is not a regular file (or a link to one)")
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_names:
        for name, info in read_header(model_dir / shard).items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice: in {tensors[name].path.name} and in {shard}"
                )
            tensors[name] = info
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {shard} but that shard lacks it")
        if tensors[name].path.name != shard:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is mapped to {shard} but is stored in {tensors[name].path.name}"
            )
    return tensors


class Checkpoint:
    """A validated model directory: config, architecture, and the location of every tensor.

    Construction reads config.json and the shard headers only. Tensors are read on demand.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(model_dir)
        self.raw_config = load_config(self.dir)
        self.spec: ArchSpec
        self.config: ModelConfig
        self.spec, self.config = resolve(self.raw_config)
        self.tensors = scan_tensors(self.dir)
        self.prefix, self.head_prefix = self._detect_prefix()
        self.layout = Layout(format_of(self.raw_config, str(self.dir / "config.json")))
        self.names: dict[tuple[Param, int | None], str] = {}
        self.experts: dict[tuple[int, int], dict[Param, str]] = {}  # (block, expert) -> that expert's tensors
        self.decoded: dict[str, TensorInfo] = {}  # a packed linear as the model uses it (no byte range in a file)
        self._bind_roles()
        if self.config.embed_scale != 1.0:  # Gemma multiplies by the scale as a tensor of the weights' dtype
            self.config.embed_scale = float(torch.tensor(self.config.embed_scale, dtype=self.dtype))

    def _detect_prefix(self) -> tuple[str, str]:
        """The prefix of the base model's names and that of the unprefixed roles (lm_head) in this checkpoint."""
        embed = self.spec.tensors[Role.TOKEN_EMBD] + ".weight"
        layouts = self.spec.layouts or ((self.spec.base_prefix, ""), ("", ""))
        for prefix, head_prefix in layouts:
            if prefix + embed in self.tensors:
                return prefix, head_prefix
        raise CheckpointError(
            f"{self.dir}: missing tensor {layouts[0][0] + embed!r} (the token embedding)"
        )

    def name_of(self, role: Role, kind: str, bid: int | None = None, xid: int | None = None) -> str:
        template = self.spec.tensors[role]
        prefix = self.head_prefix if role in self.spec.unprefixed else self.prefix
        return prefix + template.format(bid=bid, xid=xid) + "." + kind

    def _bind_roles(self) -> None:
        """Map every expected parameter to a tensor; name the missing, the misshapen and the unknown."""
        cfg = self.config
        missing: list[str] = []
        bad_shape: list[str] = []
        encoded: set[str] = set()
        fmt = self.layout.format
        dtype = self.tensors[self.name_of(Role.TOKEN_EMBD, "weight")].torch_dtype

        def bind(param: Param, shape: tuple[int, ...], bid: int | None, xid: int | None = None) -> str | None:
            name = self.name_of(*param, bid, xid)
            info = self.tensors.get(name)
            if info is None and param[1] == "weight" and fmt.name != "dense" and fmt.names(name)[0] in self.tensors:
                encoded.add(name)  # a linear stored by the checkpoint's format (packed): its parts are checked
                self.decoded[name] = TensorInfo(name, self.tensors[fmt.names(name)[0]].path, DTYPE_NAMES[dtype],
                                                tuple(shape), 0, math.prod(shape) * dtype.itemsize)
                try:
                    parts = fmt.tensors(name, dtype, shape)
                except (ArgumentError, CheckpointError) as e:
                    bad_shape.append(str(e))
                    return name
                for part, (part_dtype, part_shape) in parts.items():
                    got = self.tensors.get(part)
                    if got is None:
                        missing.append(part)
                    elif got.torch_dtype != part_dtype or got.shape != part_shape:
                        bad_shape.append(f"{part} is {got.dtype} {list(got.shape)}, {fmt.name} stores "
                                         f"{DTYPE_NAMES[part_dtype]} {list(part_shape)} for {list(shape)}")
                return name
            if info is None:
                missing.append(name)
                return None
            if info.shape != shape:
                bad_shape.append(f"{name} has shape {list(info.shape)}, config.json implies {list(shape)}")
            if info.dtype not in FLOAT_DTYPES:
                bad_shape.append(f"{name} has dtype {info.dtype}, expected one of {FLOAT_DTYPES}")
            return name

        for param, shape in expected_params(cfg).items():
            if param[0] not in BLOCK_ROLES and (name := bind(param, shape, None)):
                self.names[(param, None)] = name
        for bid in range(cfg.n_layers):
            for param, shape in expected_params(cfg, moe=cfg.is_moe(bid)).items():
                if param[0] in BLOCK_ROLES and (name := bind(param, shape, bid)):
                    self.names[(param, bid)] = name
            for xid in range(cfg.n_experts if cfg.is_moe(bid) else 0):
                self.experts[(bid, xid)] = {param: name for param, shape in expert_params(cfg).items()
                                            if (name := bind(param, shape, bid, xid))}
        stacked = sorted(n for n, info in self.tensors.items() if ".experts." in n and len(info.shape) == 3)
        if stacked:
            raise CheckpointError(
                f"{self.dir}: {stacked[0]} holds every expert of a block in one 3-D tensor "
                f"{list(self.tensors[stacked[0]].shape)}; streamprune reads one tensor per expert, the layout "
                "published checkpoints and transformers' save_pretrained write")
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise CheckpointError(f"{self.dir}: missing {len(missing)} tensor(s): {shown}")
        if bad_shape:
            raise CheckpointError(f"{self.dir}: {bad_shape[0]}" + (f" (and {len(bad_shape) - 1} more)" if len(bad_shape) > 1 else ""))
        self.layout = Layout(fmt, frozenset(encoded))
        # Where each stored tensor belongs: its block index, or None for the globals.
        self.location: dict[str, int | None] = {stored: bid for (_, bid), name in self.names.items()
                                                for stored in self.layout.stored(name)}
        self.expert_of: dict[str, tuple[int, int]] = {stored: key for key, names in self.experts.items()
                                                      for name in names.values() for stored in self.layout.stored(name)}
        self.location.update({name: bid for name, (bid, _) in self.expert_of.items()})
        for role in self.spec.optional & set(self.spec.tensors):
            for bid in range(cfg.n_layers):
                name = self.name_of(role, "inv_freq", bid)
                if name in self.tensors:
                    self.location[name] = bid
        tied_head = self.name_of(Role.OUTPUT, "weight")
        if cfg.tie_word_embeddings and tied_head in self.tensors:
            self.location[tied_head] = None
        for name in self.tensors:  # a vision tower's tensors: copied as they are, never read as roles
            if name.startswith(self.spec.passthrough) and name not in self.location:
                self.location[name] = None
        unknown = sorted(set(self.tensors) - set(self.location))
        if unknown:
            raise CheckpointError(
                f"{self.dir}: {len(unknown)} tensor(s) match no role of {self.spec.name}: {', '.join(unknown[:5])}"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (that of the token embedding)."""
        return self.tensors[self.names[((Role.TOKEN_EMBD, "weight"), None)]].torch_dtype

    def stored_names(self, bid: int | None) -> list[str]:
        """Every stored tensor of block `bid` (None: outside the blocks), pass-through buffers and experts included."""
        return sorted(name for name, b in self.location.items() if b == bid)

    def block_names(self, bid: int) -> list[str]:
        """The stored tensors of block `bid` other than its routed experts' (those stream one expert at a time)."""
        return [name for name in self.stored_names(bid) if name not in self.expert_of]

    def pruned_linears(self, bid: int) -> dict[Role, str]:
        """The linears a run prunes in block `bid` outside its routed experts: role -> checkpoint name."""
        return {role: name for ((role, kind), b), name in self.names.items()
                if b == bid and kind == "weight" and role in PRUNABLE}

    def n_experts(self, bid: int) -> int:
        return self.config.n_experts if self.config.is_moe(bid) else 0

    def info(self, name: str) -> TensorInfo:
        """Where tensor `name` lies, or for a linear the checkpoint stores packed, its shape and dtype as decoded."""
        return self.tensors[name] if name in self.tensors else self.decoded[name]

    def read(self, name: str) -> Tensor:
        """Tensor `name` as the model uses it (a packed linear decoded by the checkpoint's format)."""
        stored = self.layout.stored(name)
        return self.layout.weight(name, {s: read_tensor(self.tensors[s]) for s in stored})

    def linear_modules(self) -> list[str]:
        """The module names of the model's linear layers outside the routed experts' (those whose 2-D weights are
        not embeddings; the output head even when tied), e.g. for a quantization config's `ignore` list."""
        embeddings = {Role.TOKEN_EMBD, Role.POS_EMBD}
        weights = [name for ((role, kind), _), name in self.names.items() if kind == "weight" and role not in embeddings]
        weights += [name for names in self.experts.values() for name in names.values()]
        weights += [name for name, bid in self.location.items()  # a vision tower's linears, copied as they are
                    if name.startswith(self.spec.passthrough) and name.endswith(".weight")]
        modules = {name.removesuffix(".weight") for name in weights
                   if name in self.layout.encoded or len(self.tensors[name].shape) == 2}
        return sorted(modules | {self.name_of(Role.OUTPUT, "weight").removesuffix(".weight")})

    def load_block(self, bid: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[Param, Tensor]:
        """The parameters of one decoder block, by role, on `device` in `dtype`."""
        return self._load(bid, device, dtype)

    def load_globals(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, roles: set[Role] | None = None) -> dict[Param, Tensor]:
        """Embedding, position, norm and head parameters (or only those of `roles`)."""
        return self._load(None, device, dtype, roles)

    def _load(self, bid: int | None, device: torch.device | str, dtype: torch.dtype, roles: set[Role] | None = None) -> dict[Param, Tensor]:
        out: dict[Param, Tensor] = {}
        for (param, b), name in self.names.items():
            if b == bid and (roles is None or param[0] in roles):
                out[param] = self.read(name).to(device=device, dtype=dtype)
        return out


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


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def safetensors_header(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
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


def write_safetensors(path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], Tensor]]]) -> None:
    """Write a safetensors file tensor by tensor: each loader is called just before its data is written,
    so at most one tensor's bytes are held at a time (safetensors' own save builds the whole file in memory)."""
    with ShardFile(path, {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}) as f:
        for name, (_, _, load) in sorted(tensors.items()):
            f.put(name, load())


class ShardFile:
    """A safetensors file whose header is known before its data (names, dtypes and shapes): the header is
    written first and each tensor at its own offset, in any order, as soon as it is ready, so a block's
    pruned experts never wait in memory for each other. `close` checks that every tensor was written."""

    def __init__(self, path: Path, meta: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.path, self.meta = path, meta
        header, size = safetensors_header(meta)
        self.offsets: dict[str, int] = {}
        offset = len(header)
        for name, (dtype, shape) in sorted(meta.items()):  # the header's own order
            self.offsets[name] = offset
            offset += math.prod(shape) * dtype.itemsize
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.written: set[str] = set()
        try:
            os.ftruncate(self.fd, len(header) + size)
            write_fully(self.fd, memoryview(header), 0)
        except BaseException:
            os.close(self.fd)
            raise

    def put(self, name: str, t: Tensor) -> None:
        dtype, shape = self.meta[name]
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.path}: {name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        # flattened before the byte view: a contiguous tensor with a size-1 dimension may keep an odd stride there
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        write_fully(self.fd, memoryview(data), self.offsets[name])
        self.written.add(name)

    def close(self) -> None:
        missing = sorted(set(self.meta) - self.written)
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


def all_finite(t: Tensor, chunk_bytes: int = 16 * 2**20) -> bool:
    """No NaN or Inf in `t`, checked in slices so the temporaries stay small beside a large tensor."""
    flat = t.reshape(-1)
    step = max(1, chunk_bytes // t.element_size())
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def eager(tensors: dict[str, Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], Tensor]]]:
    """Entries for `write_safetensors` from tensors already in memory."""
    return {name: (t.dtype, tuple(t.shape), (lambda t=t: t)) for name, t in tensors.items()}


class ShardWriter:
    """Writes an output checkpoint shard by shard; `finish` writes the index from the shards' headers."""

    def __init__(self, out_dir: Path, n_shards: int) -> None:
        self.dir = out_dir
        self.n_shards = n_shards

    def shard_name(self, idx: int) -> str:
        return f"model-{idx + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, idx: int, tensors: dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], Tensor]]]) -> Path:
        """Write shard `idx` (entries as for `write_safetensors`) under a temporary name, flush it,
        rename it into place and check its header."""
        with self.open(idx, {name: (dtype, shape) for name, (dtype, shape, _) in tensors.items()}) as shard:
            for name, (_, _, load) in sorted(tensors.items()):
                shard.put(name, load())
        return self.dir / self.shard_name(idx)

    @contextlib.contextmanager
    def open(self, idx: int, meta: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> Iterator[ShardFile]:
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

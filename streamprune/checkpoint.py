"""Reading a Hugging Face checkpoint folder one tensor at a time.

Nothing here builds a state dict: config.json and every shard's header are checked up front (the index against
the shards, each tensor's byte range against its file), every tensor is bound to a role of the model's family (see
`arch.binding`), and a tensor is read only when its block is processed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamprune.arch import ArchSpec, ModelConfig, Param, Role, resolve
from streamprune.arch.binding import bind_roles
from streamprune.arch.roles import PRUNABLE, ROUTER_ROLES, expert_axis
from streamprune.errors import CheckpointError
from streamprune.formats import format_of
from streamprune.tensorfile import DTYPE_NAMES, TensorInfo, all_finite, lookup, read_header, read_tensor

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# what configs call the routed experts
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

__all__ = ["INDEX_NAME", "SINGLE_NAME", "Checkpoint", "TensorInfo", "all_finite", "load_config", "read_header",
           "read_tensor", "scan_tensors"]


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
        binding = bind_roles(self.spec, self.config, self.tensors, format_of(self.raw_config, str(self.dir / "config.json")),
                             self.dir)
        self.name_of = binding.name_of
        self.layout = binding.layout  # the checkpoint's format over the linears it stores encoded
        self.names = binding.names  # (param, block or None) -> stored name
        self.experts = binding.experts  # (block, expert) -> that expert's tensors
        self.location = binding.location  # tensor (the model's name) -> its block (None: outside the blocks)
        self.expert_of = binding.expert_of  # a routed expert's tensor -> (block, expert)
        self.mtp = binding.mtp  # a multi-token-prediction layer's tensor -> its layer (copied as it is)
        # a packed linear as the model uses it (no byte range in a file)
        self.decoded = {name: TensorInfo(name, self.part(self.layout.stored(name)[0]).path, DTYPE_NAMES[dtype],
                                         shape, 0, math.prod(shape) * dtype.itemsize)
                        for name, (dtype, shape) in binding.decoded.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point dtype (that of the token embedding)."""
        return self.tensors[self.names[((Role.TOKEN_EMBD, "weight"), None)]].torch_dtype

    def stored_names(self, bid: int | None) -> list[str]:
        """Every tensor of block `bid` (None: outside the blocks), pass-through buffers and experts included, by the
        name the model uses (an encoded linear's dense name; `layout.stored` names its parts)."""
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

    def part(self, name: str) -> TensorInfo:
        """Where stored tensor `name` lies, or a slice `NAME[i]` of one (a fused expert's)."""
        return lookup(self.tensors, name)

    def keeping_experts(self, kept: int) -> Checkpoint:
        """The structure of this model with `kept` routed experts in each MoE block, numbered 0..kept-1 (what a run
        that removes experts writes): its config (the expert count under every key the config has for it), names,
        dtypes and shapes (the router's rows cut to `kept`). It describes shards to write or written; it reads
        nothing of the input."""
        if kept == self.config.n_experts:
            return self
        out = copy.copy(self)
        out.raw_config = self.edit_text_config(lambda text: {**text, **{key: kept for key in EXPERT_COUNT_KEYS
                                                                         if key in text}})
        out.config = dataclasses.replace(self.config, n_experts=kept)
        out.experts = {(bid, xid): names for (bid, xid), names in self.experts.items() if xid < kept}
        gone = {name for (_, xid), names in self.experts.items() if xid >= kept for name in names.values()}
        out.expert_of = {name: key for name, key in self.expert_of.items() if name not in gone}
        out.location = {name: bid for name, bid in self.location.items() if name not in gone}
        parts = {part for name in gone for part in self.layout.stored(name)}
        out.tensors = {name: info for name, info in self.tensors.items() if name not in parts}
        out.decoded = {name: info for name, info in self.decoded.items() if name not in gone}
        fused = self.layout.fused_tensors()  # cut along the experts, as the router is
        out.tensors.update({name: self.tensors[name].keeping(kept) for name in fused})
        out.layout = dataclasses.replace(self.layout, fused={
            name: dataclasses.replace(piece, shape=(kept, *piece.shape[1:]))
            for name, piece in self.layout.fused.items() if name not in gone})
        if self.mtp:  # a multi-token-prediction layer keeps every expert: it no longer fits the model, so it is left out
            out.raw_config = self.edit_text_config(lambda text: {**text, self.spec.mtp_key: 0}, out.raw_config)
            out.location = {name: bid for name, bid in out.location.items() if name not in self.mtp}
            out.tensors = {name: info for name, info in out.tensors.items() if name not in self.mtp}
            out.mtp = {}
        for ((role, _), bid), name in self.names.items():
            if role in ROUTER_ROLES and bid is not None:  # one entry per expert
                out.tensors[name] = self.tensors[name].keeping(kept, expert_axis(role))
        return out

    def edit_text_config(self, edit: Callable[[dict[str, Any]], dict[str, Any]],
                         raw: dict[str, Any] | None = None) -> dict[str, Any]:
        """config.json (`raw`, default this checkpoint's) with the language model's section replaced by `edit` of it
        (an image-text model's `text_config`, else the whole)."""
        raw = self.raw_config if raw is None else raw
        key = self.spec.text_config
        return {**raw, key: edit(raw[key])} if key else edit(raw)

    def info(self, name: str) -> TensorInfo:
        """Where tensor `name` lies, or for a linear the checkpoint stores encoded (packed, fp8), its shape and dtype
        as decoded."""
        return self.decoded[name] if name in self.decoded else self.tensors[name]

    def stored_bytes(self, *names: str) -> int:
        """The bytes the checkpoint stores tensors `names` in (an encoded linear's parts together; a fused expert's
        slice counted once for its linears)."""
        return sum(self.part(part).nbytes for part in {p for name in names for p in self.layout.stored(name)})

    def read(self, name: str) -> Tensor:
        """Tensor `name` as the model uses it (a packed linear decoded by the checkpoint's format)."""
        stored = self.layout.stored(name)
        return self.layout.weight(name, {s: read_tensor(self.part(s)) for s in stored})

    def linear_modules(self) -> list[str]:
        """The module names of the model's linear layers outside the routed experts' (those whose 2-D weights are
        not embeddings; the output head even when tied), e.g. for a quantization config's `ignore` list."""
        embeddings = {Role.TOKEN_EMBD, Role.POS_EMBD}
        weights = [name for ((role, kind), _), name in self.names.items() if kind == "weight" and role not in embeddings]
        weights += [name for names in self.experts.values() for name in names.values()]
        weights += [name for name, bid in self.location.items()  # a vision tower's linears, copied as they are
                    if name.startswith(self.spec.passthrough) and name.endswith(".weight")]
        modules = {name.removesuffix(".weight") for name in weights
                   if name in self.layout.encoded or len(self.info(name).shape) == 2}
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

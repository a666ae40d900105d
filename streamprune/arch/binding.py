"""Binding a family's role table to the tensors a checkpoint holds.

Every parameter the config implies maps to exactly one stored tensor (or, for a linear the checkpoint stores in a
quantized format, to that format's parts); a missing, misshapen or unknown tensor is an error that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamprune.arch.config import ModelConfig, get_int
from streamprune.arch.roles import BLOCK_ROLES, Role
from streamprune.arch.spec import ArchSpec, Param, expected_params, expert_params
from streamprune.errors import ArgumentError, CheckpointError
from streamprune.formats import Layout, OutputFormat
from streamprune.fused import Piece
from streamprune.tensorfile import DTYPE_NAMES, TensorInfo

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass
class Binding:
    """Where each role of each block lies in one checkpoint."""

    spec: ArchSpec
    prefix: str  # in front of the base model's names
    head_prefix: str  # in front of the unprefixed roles (lm_head)
    layout: Layout  # the checkpoint's format over the linears it encodes
    names: dict[tuple[Param, int | None], str] = field(default_factory=dict)  # (param, block or None) -> name
    experts: dict[tuple[int, int], dict[Param, str]] = field(default_factory=dict)  # (block, expert) -> its tensors
    decoded: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)  # an encoded linear, decoded
    # by the names the model uses (an encoded linear's dense name; `layout.stored` gives its parts)
    location: dict[str, int | None] = field(default_factory=dict)  # tensor -> its block (None: outside)
    expert_of: dict[str, tuple[int, int]] = field(default_factory=dict)  # an expert's tensor -> (block, expert)
    mtp: dict[str, int] = field(default_factory=dict)  # a multi-token-prediction layer's tensor -> its layer index
    fused: dict[str, Piece] = field(default_factory=dict)  # a routed expert's linear stored fused -> its piece

    def name_of(self, role: Role, kind: str, bid: int | None = None, xid: int | None = None) -> str:
        prefix = self.head_prefix if role in self.spec.unprefixed else self.prefix
        return prefix + self.spec.tensors[role].format(bid=bid, xid=xid) + "." + self.spec.kinds.get((role, kind), kind)


def detect_prefix(spec: ArchSpec, tensors: dict[str, TensorInfo], where: Path) -> tuple[str, str]:
    """The prefix of the base model's names and that of the unprefixed roles (lm_head) in this checkpoint."""
    embed = spec.tensors[Role.TOKEN_EMBD] + ".weight"
    layouts = spec.layouts or ((spec.base_prefix, ""), ("", ""))
    for prefix, head_prefix in layouts:
        if prefix + embed in tensors:
            return prefix, head_prefix
    raise CheckpointError(f"{where}: missing tensor {layouts[0][0] + embed!r} (the token embedding)")


class _Checks:
    """What binding found wrong, reported together once every parameter was looked up."""

    def __init__(self) -> None:
        self.missing: list[str] = []
        self.bad: list[str] = []

    def raise_any(self, where: Path) -> None:
        if self.missing:
            shown = ", ".join(self.missing[:8]) + (f" and {len(self.missing) - 8} more" if len(self.missing) > 8 else "")
            raise CheckpointError(f"{where}: missing {len(self.missing)} tensor(s): {shown}")
        if self.bad:
            more = f" (and {len(self.bad) - 1} more)" if len(self.bad) > 1 else ""
            raise CheckpointError(f"{where}: {self.bad[0]}" + more)


def bind_roles(spec: ArchSpec, cfg: ModelConfig, tensors: dict[str, TensorInfo], fmt: OutputFormat,
               where: Path) -> Binding:
    """Map every expected parameter of `cfg` to a tensor of `tensors` (stored in format `fmt`); name the missing, the
    misshapen and the unknown. The config's embedding scale is rounded to the weights' dtype on the way."""
    binding = Binding(spec, *detect_prefix(spec, tensors, where), Layout(fmt))
    dtype = tensors[binding.name_of(Role.TOKEN_EMBD, "weight")].torch_dtype
    fmt = fmt.bound(dtype, tensors)
    binding.layout = Layout(fmt)
    checks, encoded = _Checks(), set()

    def check(name: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
        if info.shape != shape:
            checks.bad.append(f"{name} has shape {list(info.shape)}, config.json implies {list(shape)}")
        if info.dtype.startswith("F8_") and fmt.name == "fp8":
            checks.bad.append(f"{name} is {info.dtype} without its scale {fmt.names(name)[1]}")
        elif info.dtype.startswith("F8_"):
            checks.bad.append(f"{name} is {info.dtype} but config.json has no fp8 quantization_config")
        elif info.dtype not in FLOAT_DTYPES:
            checks.bad.append(f"{name} has dtype {info.dtype}, expected one of {FLOAT_DTYPES}")

    def bind(param: Param, shape: tuple[int, ...], bid: int | None, xid: int | None = None) -> str | None:
        name = binding.name_of(*param, bid, xid)
        info = tensors.get(name)
        if param[1] == "weight" and fmt.stores(name, tensors):
            encoded.add(name)  # a linear stored by the checkpoint's format (packed, fp8): its parts are checked
            binding.decoded[name] = (dtype, tuple(shape))
            check_encoded(fmt, name, dtype, shape, tensors, checks)
            return name
        if info is None:
            checks.missing.append(name)
            return None
        check(name, info, shape)
        return name

    for param, shape in expected_params(cfg).items():
        if param[0] not in BLOCK_ROLES and (name := bind(param, shape, None)):
            binding.names[(param, None)] = name
    for bid in range(cfg.n_layers):
        for param, shape in expected_params(cfg.block(bid), cfg.is_moe(bid), cfg.is_linear(bid)).items():
            if param[0] in BLOCK_ROLES and (name := bind(param, shape, bid)):
                binding.names[(param, bid)] = name
        if cfg.is_moe(bid) and stored_fused(binding, bid, tensors):
            encoded |= bind_fused(binding, cfg, bid, tensors, dtype, check, checks)
            continue
        for xid in range(cfg.n_experts if cfg.is_moe(bid) else 0):
            binding.experts[(bid, xid)] = {param: name for param, shape in expert_params(cfg).items()
                                           if (name := bind(param, shape, bid, xid))}
    binding.mtp = mtp_layers(binding, cfg, tensors)
    bound = Layout(fmt, frozenset(encoded), binding.fused)  # its parts, and MTP layers (copied as stored), are no
    stored = stored_parts(bound) | set(binding.mtp)          # stacked experts
    stacked = sorted(n for n, info in tensors.items() if ".experts." in n and len(info.shape) == 3 and n not in stored)
    if stacked:
        raise CheckpointError(
            f"{where}: {stacked[0]} holds every expert of a block in one 3-D tensor {list(tensors[stacked[0]].shape)}; "
            f"{spec.name} is read with one tensor per expert ({binding.name_of(Role.FFN_GATE_EXP, 'weight', 0, 0)}, "
            "...), the layout its published checkpoints and transformers' save_pretrained write")
    checks.raise_any(where)
    binding.layout = Layout(fmt, frozenset(encoded), binding.fused)
    locate(binding, cfg, tensors, where)
    if cfg.embed_scale != 1.0:  # Gemma multiplies by the scale as a tensor of the weights' dtype
        cfg.embed_scale = float(torch.tensor(cfg.embed_scale, dtype=dtype))
    return binding


def fused_names(binding: Binding, bid: int) -> tuple[str, str] | None:
    """The names of block `bid`'s fused gate_up and down tensors, where its family can store them fused."""
    row = binding.spec.fused
    if row is None:
        return None
    return binding.prefix + row.gate_up.format(bid=bid), binding.prefix + row.down.format(bid=bid)


def stored_fused(binding: Binding, bid: int, tensors: dict[str, TensorInfo]) -> bool:
    """Whether block `bid`'s routed experts are stored fused: its family's fused gate_up is there (as itself or as
    its format's parts) and its first expert's own gate is not."""
    names = fused_names(binding, bid)
    first = binding.name_of(Role.FFN_GATE_EXP, "weight", bid, 0)
    if names is None or first in tensors:
        return False
    return names[0] in tensors or binding.layout.format.stores(names[0], tensors)


def bind_fused(binding: Binding, cfg: ModelConfig, bid: int, tensors: dict[str, TensorInfo], dtype: torch.dtype,
               check: Callable[[str, TensorInfo, tuple[int, ...]], None], checks: _Checks) -> set[str]:
    """Block `bid`'s routed experts from its fused tensors: each expert's linears, under the names a per-expert
    checkpoint gives them, are pieces of its slices (fused.py); the tensors' shapes and dtypes are checked. A fused
    tensor the checkpoint's format stores (MXFP4's blocks and scales) decodes to `dtype`. Returns the experts' names
    stored encoded."""
    row, names = binding.spec.fused, fused_names(binding, bid)
    assert row is not None and names is not None
    fmt, encoded = binding.layout.format, set()
    shapes = dict(zip(names, row.shapes(cfg.n_experts, cfg.expert_ffn_dim, cfg.hidden_size)))
    stored_encoded = {name: fmt.stores(name, tensors) for name in names}
    for name, shape in shapes.items():
        if stored_encoded[name]:
            check_encoded(fmt, name, dtype, shape, tensors, checks)
        elif name not in tensors:
            checks.missing.append(name)
        else:
            check(name, tensors[name], (shape[0], *shape[1:][::-1]) if row.transposed else shape)
    if row.bias:
        for name, shape in shapes.items():
            if name + "_bias" not in tensors:
                checks.missing.append(name + "_bias")
            else:
                check(name + "_bias", tensors[name + "_bias"], shape[:2])
    of = {Role.FFN_GATE_EXP: (names[0], "gate"), Role.FFN_UP_EXP: (names[0], "up"), Role.FFN_DOWN_EXP: (names[1], "down")}
    for xid in range(cfg.n_experts):
        experts = binding.experts[(bid, xid)] = {}
        for param, shape in expert_params(cfg).items():
            name = binding.name_of(*param, bid, xid)
            tensor, part = of[param[0]]
            if param[1] == "bias":
                tensor += "_bias"
                info = tensors.get(tensor)
                binding.fused[name] = Piece(tensor, xid, part, shapes[of[param[0]][0]][:2], row, "bias")
                binding.decoded[name] = (dtype if info is None else info.torch_dtype, tuple(shape))
            else:
                info = tensors.get(tensor)
                binding.fused[name] = Piece(tensor, xid, part, shapes[tensor], row)
                binding.decoded[name] = (dtype if info is None else info.torch_dtype, tuple(shape))
                if stored_encoded[tensor]:
                    encoded.add(name)
            experts[param] = name
    return encoded


def check_encoded(fmt: OutputFormat, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                  tensors: dict[str, TensorInfo], checks: _Checks) -> None:
    """The stored parts of linear `name` (dense `dtype` `shape`), as format `fmt` stores it."""
    try:
        parts = fmt.tensors(name, dtype, shape)
    except (ArgumentError, CheckpointError) as e:
        checks.bad.append(str(e))
        return
    for part, (part_dtype, part_shape) in parts.items():
        got = tensors.get(part)
        if got is None:
            checks.missing.append(part)
        elif got.torch_dtype != part_dtype or got.shape != part_shape:
            checks.bad.append(f"{part} is {got.dtype} {list(got.shape)}, {fmt.name} stores "
                              f"{DTYPE_NAMES[part_dtype]} {list(part_shape)} for {list(shape)}")


def mtp_layers(binding: Binding, cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> dict[str, int]:
    """The tensors of multi-token-prediction layers (copied as they are, never read) and each one's layer index: past
    the model's blocks under its own names (DeepSeek-V3, GLM-4.5: `num_nextn_predict_layers` more `layers.{i}`), or
    stored apart (Qwen3-Next's `mtp.fc`, `mtp.norm`, `mtp.layers.{i}`: layer i counts past the last block)."""
    found = {}
    nextn = get_int(cfg.raw, "num_nextn_predict_layers", default=0)
    for layer in range(cfg.n_layers, cfg.n_layers + max(nextn, 0)):
        prefix = f"{binding.prefix}layers.{layer}."
        found.update({name: layer for name in tensors if name.startswith(prefix)})
    prefix = binding.spec.mtp_prefix
    if prefix:
        for name in tensors:
            if name.startswith(prefix):
                index = name.removeprefix(prefix + "layers.").split(".")[0]
                found[name] = cfg.n_layers + (int(index) if index.isdigit() else 0)
    return found


def stored_parts(layout: Layout) -> set[str]:
    """The stored tensors that hold a checkpoint's encoded linears and fused experts (not names of the model)."""
    parts = {part for name in layout.encoded if name not in layout.fused for part in layout.stored(name)}
    return parts | layout.fused_tensors()


def locate(binding: Binding, cfg: ModelConfig, tensors: dict[str, TensorInfo], where: Path) -> None:
    """Where each stored tensor belongs: its block index, or None for the globals; a tensor that belongs nowhere is
    refused."""
    layout, spec = binding.layout, binding.spec
    binding.location = {name: bid for (_, bid), name in binding.names.items()}  # by the names the model uses
    binding.expert_of = {name: key for key, names in binding.experts.items() for name in names.values()}
    binding.location.update({name: bid for name, (bid, _) in binding.expert_of.items()})
    parts = stored_parts(layout)
    for role in spec.optional & set(spec.tensors):
        for bid in range(cfg.n_layers):
            name = binding.name_of(role, "inv_freq", bid)
            if name in tensors:
                binding.location[name] = bid
    tied_head = binding.name_of(Role.OUTPUT, "weight")
    if cfg.tie_word_embeddings and tied_head in tensors:
        binding.location[tied_head] = None
    for name in tensors:  # a vision tower's tensors: copied as they are, never read as roles
        if name.startswith(spec.passthrough) and name not in binding.location:
            binding.location[name] = None
    binding.location.update({name: None for name in binding.mtp if name not in binding.location})
    unknown = sorted(set(tensors) - set(binding.location) - parts)
    if unknown:
        raise CheckpointError(f"{where}: {len(unknown)} tensor(s) match no role of {spec.name}: {', '.join(unknown[:5])}")

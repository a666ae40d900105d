"""Output formats: how a pruned (and possibly quantized) linear weight is stored in a checkpoint, and read back.

One interface, one class per format (compressed-tensors' compressor registry: `compress_weight` /
`decompress_weight` per format). The pipeline writes every pruned linear through `encode`, and the block
iterator reads it back through `decode`, for replay on resume, for `eval` and for `logits`: what the run used
is what was written, and what was written is what a loader computes.

- `DenseFormat`: the weight in the input's dtype, under the input's name (streamprune's original output).
- `CompressedTensorsFormat`: compressed-tensors' `pack-quantized` format, the weight-only integer format that
  transformers (through the compressed-tensors package) and vLLM load: `<module>.weight_packed` (int32, the
  codes packed along the input dimension, `bits` bits each, lowest bits first, one row's bit stream running on
  across words), `<module>.weight_scale` (the model's dtype, one per row and group), `<module>.weight_shape`
  (int64, the dense shape) and, for an asymmetric grid, `<module>.weight_zero_point` (int32, the zero points
  packed the same way along the *output* dimension); the config's `quantization_config` names the grid.

- `Fp8BlockFormat`: the block-scaled FP8 format DeepSeek-V3, Kimi-K2, GLM-4.5-FP8 and MiniMax-M2 are published
  in: `<module>.weight` (float8 e4m3) and `<module>.weight_scale_inv` (one scale per tile of 128 x 128 weights,
  the tiles at the right and bottom edges cropped; float32, bfloat16 or float8 e8m0), W = weight x scale tile by
  tile; the config's `quantization_config` is `{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128,
  128]}`.

A quantized weight arrives as codes, scales and zero points (`Quantized`: the quantizing solver's result):
the run's weight is `(codes - zero[:, g]) * scale[:, g]`, g = column // group_size. A loader computes that
product in the dtype of the stored scale, so the scales must be representable in the model's dtype
(`round_scale`), and the weight the run goes on with is `decode(encode(...))`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from streamprune.errors import ArgumentError, CheckpointError
from streamprune.fileio import atomic_write
from streamprune.fused import Piece, join
from streamprune.tensorfile import slice_name

Meta = tuple[torch.dtype, tuple[int, ...]]  # a stored tensor's dtype and shape


class GridArgs(Protocol):
    """The quantization grid of a run: `bits` per weight, `group_size` columns per scale (-1: one group per
    row), symmetric or not (the quantizing solver's `Grid`)."""

    bits: int
    group_size: int
    sym: bool


class Quantized(Protocol):
    """One quantized linear as solved: codes uint8 (rows, cols) in [0, 2**bits - 1], scale float32
    (rows, groups), zero uint8 or int32 (rows, groups) in [0, 2**bits - 1] (2**(bits - 1) when symmetric)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


class OutputFormat(ABC):
    """How the linear weights a run prunes are stored. Every other tensor is written as it was read."""

    name: ClassVar[str]

    @abstractmethod
    def names(self, weight: str) -> list[str]:
        """The stored tensors that hold the linear weight named `weight` (e.g. `...q_proj.weight`)."""

    @abstractmethod
    def tensors(self, weight: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        """Name, dtype and shape of each stored tensor of linear `weight`, whose dense form is `dtype` `shape`:
        known before the weight is solved, so that a shard's header is written first."""

    @abstractmethod
    def encode(self, weight: str, value: Tensor, quant: Quantized | None = None) -> dict[str, Tensor]:
        """The stored tensors of linear `weight`: `value` is the weight the run goes on with, in the stored dtype;
        `quant` its codes, scales and zero points when the run quantized it."""

    @abstractmethod
    def decode(self, weight: str, stored: Mapping[str, Tensor]) -> Tensor:
        """Linear `weight` as the run used it and as a loader computes it, in the model's dtype, from its stored
        tensors (`stored` may hold others too)."""

    def round_scale(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """The float32 scales this format stores for a model of `dtype` (a quantizing solver grids its columns
        with these, so that the written weight is the one it solved for)."""
        return scale.float()

    def quantization_config(self, ignore: Iterable[str]) -> dict[str, Any] | None:
        """config.json's `quantization_config` of the output (None: none), `ignore` naming the linear modules
        left unquantized."""
        return None

    def stores(self, weight: str, tensors: Mapping[str, Any]) -> bool:
        """Whether a checkpoint whose tensors are `tensors` stores linear `weight` in this format."""
        return weight not in tensors and self.names(weight)[0] in tensors

    def bound(self, dtype: torch.dtype, tensors: Mapping[str, Any]) -> OutputFormat:
        """This format as it reads a checkpoint of `dtype` (the embedding's) holding `tensors`."""
        return self


class DenseFormat(OutputFormat):
    """The weight in the model's dtype, under its own name: an ordinary checkpoint."""

    name = "dense"

    def names(self, weight: str) -> list[str]:
        return [weight]

    def tensors(self, weight: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        return {weight: (dtype, tuple(shape))}

    def encode(self, weight: str, value: Tensor, quant: Quantized | None = None) -> dict[str, Tensor]:
        return {weight: value}

    def decode(self, weight: str, stored: Mapping[str, Tensor]) -> Tensor:
        return stored[weight]

    def stores(self, weight: str, tensors: Mapping[str, Any]) -> bool:
        return False


PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
CT_BITS = (2, 3, 4, 8)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def packed_width(n: int, bits: int) -> int:
    """int32 words that hold `n` values of `bits` bits as one bit stream."""
    return math.ceil(n * bits / 32)


def _to_int32(words: Tensor) -> Tensor:
    """int64 words in [0, 2**32) as int32 of the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: Tensor, bits: int, chunk: int = 1 << 20) -> Tensor:
    """Pack integers in [0, 2**bits) (rows, n) into int32 (rows, ceil(n * bits / 32)): each row is a bit stream,
    value i at bits [i * bits, (i + 1) * bits), word w holding stream bits [32 w, 32 w + 32), lowest bits
    first. Rows are packed `chunk` values at a time, so the temporaries stay small beside a large linear."""
    rows, n = values.shape
    width = packed_width(n, bits)
    out = torch.empty(rows, width, dtype=torch.int32, device=values.device)
    step = max(1, chunk // max(n, 1))
    for r in range(0, rows, step):
        v = values[r : r + step].to(torch.int64)  # (R, n)
        if 32 % bits == 0:  # whole values per word
            per = 32 // bits
            v = torch.nn.functional.pad(v, (0, width * per - n)).reshape(v.shape[0], width, per)  # (R, width, per)
            shifts = torch.arange(per, device=v.device, dtype=torch.int64) * bits
            words = (v << shifts).sum(-1)  # disjoint bits: the sum is their OR
        else:  # values straddle words: through the bit stream
            stream = (v.unsqueeze(-1) >> torch.arange(bits, device=v.device)) & 1  # (R, n, bits)
            stream = stream.reshape(v.shape[0], n * bits)
            stream = torch.nn.functional.pad(stream, (0, width * 32 - n * bits)).reshape(v.shape[0], width, 32)
            words = (stream << torch.arange(32, device=v.device, dtype=torch.int64)).sum(-1)
        out[r : r + step] = _to_int32(words)
    return out


def unpack_rows(packed: Tensor, bits: int, n: int, chunk: int = 1 << 20) -> Tensor:
    """The inverse of `pack_rows`: (rows, n) integers in [0, 2**bits), as int32."""
    rows, width = packed.shape
    if width != packed_width(n, bits):
        raise CheckpointError(f"{width} packed words per row cannot hold {n} values of {bits} bits")
    out = torch.empty(rows, n, dtype=torch.int32, device=packed.device)
    step = max(1, chunk // max(n, 1))
    for r in range(0, rows, step):
        words = packed[r : r + step].to(torch.int64) & 0xFFFFFFFF  # (R, width)
        if 32 % bits == 0:
            per = 32 // bits
            shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
            v = ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(words.shape[0], width * per)[:, :n]
        else:
            stream = (words.unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1  # (R, width, 32)
            stream = stream.reshape(words.shape[0], width * 32)[:, : n * bits].reshape(words.shape[0], n, bits)
            v = (stream << torch.arange(bits, device=words.device, dtype=torch.int64)).sum(-1)
        out[r : r + step] = v.to(torch.int32)
    return out


def module_of(weight: str) -> str:
    """`model.layers.0.self_attn.q_proj` of `model.layers.0.self_attn.q_proj.weight`."""
    if not weight.endswith(".weight"):
        raise CheckpointError(f"{weight!r} is not a linear weight (a name ending in '.weight')")
    return weight.removesuffix(".weight")


class CompressedTensorsFormat(OutputFormat):
    """compressed-tensors' `pack-quantized` format for integer weights of 2, 3, 4 or 8 bits, group-wise
    (`group_size` > 0, dividing the input width) or per channel (-1), symmetric or asymmetric (the zero points
    stored). Facts checked against compressed-tensors 0.20.1 in tests/test_formats.py."""

    name = "compressed-tensors"

    def __init__(self, grid: GridArgs) -> None:
        bits, group_size, sym = int(grid.bits), int(grid.group_size), bool(grid.sym)
        if bits not in CT_BITS:
            raise ArgumentError(f"--format compressed-tensors stores {', '.join(map(str, CT_BITS))} bits, not {bits!r}")
        if group_size != -1 and group_size < 1:
            raise ArgumentError(f"group size {group_size!r} must be positive, or -1 for one group per row")
        self.bits, self.group_size, self.sym = bits, group_size, sym

    def __repr__(self) -> str:
        return f"CompressedTensorsFormat(bits={self.bits}, group_size={self.group_size}, sym={self.sym})"

    def names(self, weight: str) -> list[str]:
        module = module_of(weight)
        suffixes = PACKED_SUFFIXES if not self.sym else PACKED_SUFFIXES[:3]
        return [f"{module}.{s}" for s in suffixes]

    def groups(self, weight: str, columns: int) -> int:
        if self.group_size == -1:
            return 1
        if columns % self.group_size:
            raise ArgumentError(
                f"{weight}: {columns} input columns are not a multiple of the group size {self.group_size} "
                "(compressed-tensors needs whole groups); choose a group size that divides them, or -1")
        return columns // self.group_size

    def tensors(self, weight: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        if len(shape) != 2:
            raise CheckpointError(f"{weight}: shape {list(shape)} is not that of a linear weight")
        if dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{weight}: dtype {dtype} is not a floating-point dtype for the scales")
        rows, cols = shape
        groups = self.groups(weight, cols)
        packed, scale, wshape, *zero = self.names(weight)
        meta = {packed: (torch.int32, (rows, packed_width(cols, self.bits))), scale: (dtype, (rows, groups)),
                wshape: (torch.int64, (2,))}
        if zero:
            meta[zero[0]] = (torch.int32, (packed_width(rows, self.bits), groups))
        return meta

    def round_scale(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        return scale.to(dtype).float()

    def encode(self, weight: str, value: Tensor, quant: Quantized | None = None) -> dict[str, Tensor]:
        if quant is None:
            raise ArgumentError(f"{weight}: --format compressed-tensors stores quantized weights; pass --wbits")
        codes, scale, zero = quant.codes, quant.scale, quant.zero
        rows, cols = codes.shape
        groups = self.groups(weight, cols)
        top = 2**self.bits - 1
        if tuple(scale.shape) != (rows, groups) or tuple(zero.shape) != (rows, groups):
            raise ValueError(f"{weight}: scale {list(scale.shape)} and zero {list(zero.shape)} do not fit codes "
                             f"{list(codes.shape)} in groups of {self.group_size}")
        if int(codes.min()) < 0 or int(codes.max()) > top or int(zero.min()) < 0 or int(zero.max()) > top:
            raise ValueError(f"{weight}: codes or zero points outside [0, {top}] for {self.bits} bits")
        if self.sym and bool((zero != 2 ** (self.bits - 1)).any()):
            raise ValueError(f"{weight}: a symmetric grid's zero points are {2 ** (self.bits - 1)}")
        stored_scale = scale.to(value.dtype)
        if not torch.equal(stored_scale.float(), scale.float()):
            raise ValueError(f"{weight}: scales are not representable in {value.dtype}: round them with "
                             "round_scale before gridding, or the written weight differs from the solved one")
        packed, scale_name, wshape, *zero_name = self.names(weight)
        out = {packed: pack_rows(codes, self.bits), scale_name: stored_scale,
               wshape: torch.tensor([rows, cols], dtype=torch.int64, device=codes.device)}
        if zero_name:  # packed along the output dimension: one bit stream per group column
            out[zero_name[0]] = pack_rows(zero.T, self.bits).T.contiguous()
        return out

    def decode(self, weight: str, stored: Mapping[str, Tensor]) -> Tensor:
        packed, scale_name, wshape, *zero_name = self.names(weight)
        rows, cols = (int(d) for d in stored[wshape].tolist())
        scale = stored[scale_name]
        codes = unpack_rows(stored[packed], self.bits, cols)  # (rows, cols)
        if zero_name:
            zero = unpack_rows(stored[zero_name[0]].T.contiguous(), self.bits, rows).T  # (rows, groups)
        else:
            zero = torch.full_like(scale, 2 ** (self.bits - 1), dtype=torch.int32)
        group = cols if self.group_size == -1 else self.group_size
        centred = (codes.reshape(rows, -1, group) - zero.unsqueeze(-1)).to(torch.float32)  # (rows, groups, group)
        # the product of a small integer and a scale is exact in float32; one rounding to the scale's dtype follows,
        # as in a loader that multiplies in that dtype
        return (centred * scale.float().unsqueeze(-1)).reshape(rows, cols).to(scale.dtype)

    def quantization_config(self, ignore: Iterable[str]) -> dict[str, Any]:
        strategy = "channel" if self.group_size == -1 else "group"
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.sym, "strategy": strategy,
                   "group_size": None if self.group_size == -1 else self.group_size, "dynamic": False}
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": sorted(set(ignore)),
            "kv_cache_scheme": None,
        }


FP8_MAX = 448.0  # the largest float8 e4m3 value
FP8_SCALE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float8_e8m0fnu: "ue8m0"}


@dataclass(frozen=True)
class Fp8BlockFormat(OutputFormat):
    """Float8 e4m3 weights with one scale per `block` tile (rows, columns), tiles at the edges cropped: W = weight x
    scale. A weight is encoded tile by tile with scale = amax / 448 (the tile's largest magnitude onto float8's
    largest value), rounded to the scales' dtype (a power of two at or above it for e8m0; an all-zero tile's scale
    is 1), so pruned weights stay exactly 0. Decoding multiplies in float64 and rounds once to the model's `dtype`,
    as a loader that dequantizes to the model's dtype does."""

    name: ClassVar[str] = "fp8"
    block: tuple[int, int] = (128, 128)
    scale_dtype: torch.dtype = torch.float32
    dtype: torch.dtype = torch.bfloat16  # the model's (decoded weights')
    rows_at_once: int = 1024  # rows decoded or encoded at a time: the float64 temporaries stay small
    # the scale's name beside `<module>.weight`: DeepSeek-V3's `weight_scale_inv`, or compressed-tensors'
    # `weight_scale` (its float-quantized format with block strategy, as Mistral Large 3 is published)
    scale_name: str = "weight_scale_inv"

    def __post_init__(self) -> None:
        if len(self.block) != 2 or not all(isinstance(b, int) and b > 0 for b in self.block):
            raise CheckpointError(f"weight_block_size {list(self.block)!r} is not two positive integers")
        if self.scale_dtype not in FP8_SCALE_DTYPES:
            raise CheckpointError(f"fp8 scales stored as {self.scale_dtype} are not read; expected float32, bfloat16 "
                                  "or float8_e8m0fnu")

    def names(self, weight: str) -> list[str]:
        return [weight, f"{module_of(weight)}.{self.scale_name}"]

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def tensors(self, weight: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        if len(shape) != 2:
            raise CheckpointError(f"{weight}: shape {list(shape)} is not that of a linear weight")
        stored, scale = self.names(weight)
        return {stored: (torch.float8_e4m3fn, tuple(shape)), scale: (self.scale_dtype, self.scale_shape(shape))}

    def stores(self, weight: str, tensors: Mapping[str, Any]) -> bool:
        return self.names(weight)[1] in tensors

    def bound(self, dtype: torch.dtype, tensors: Mapping[str, Any]) -> OutputFormat:
        scales = sorted({info.torch_dtype for name, info in tensors.items() if name.endswith("." + self.scale_name)},
                        key=str)
        if len(scales) > 1:
            raise CheckpointError(f"fp8 scales stored in {len(scales)} dtypes ({', '.join(map(str, scales))}); "
                                  "expected one")
        return dataclasses.replace(self, dtype=dtype, scale_dtype=scales[0] if scales else self.scale_dtype)

    def tiles(self, t: Tensor, rows: int, cols: int) -> Tensor:
        """Per-tile values `t` (tile rows, tile columns) spread over the (rows, cols) weights they scale."""
        br, bc = self.block
        return t.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]

    def decode(self, weight: str, stored: Mapping[str, Tensor]) -> Tensor:
        name, scale_name = self.names(weight)
        q, scale = stored[name], stored[scale_name]
        rows, cols = q.shape
        if q.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{name} is {q.dtype}, fp8 stores float8_e4m3fn")
        if tuple(scale.shape) != self.scale_shape((rows, cols)):
            raise CheckpointError(f"{scale_name} has shape {list(scale.shape)}, {list(self.scale_shape((rows, cols)))}"
                                  f" tiles of {self.block[0]} x {self.block[1]} cover {name} {[rows, cols]}")
        out = torch.empty(rows, cols, dtype=self.dtype, device=q.device)
        step = max(self.block[0], self.rows_at_once // self.block[0] * self.block[0])
        for r in range(0, rows, step):
            s = self.tiles(scale[r // self.block[0] : (r + step) // self.block[0] + 1].double(), min(step, rows - r), cols)
            out[r : r + step] = (q[r : r + step].double() * s).to(self.dtype)
        return out

    def round_scale(self, scale: Tensor, dtype: torch.dtype) -> Tensor:
        """Tile scales as stored: float32 or bfloat16 as rounded (a value that rounds past 448 is clipped when
        encoded), e8m0 the power of two at or above the scale."""
        if self.scale_dtype == torch.float8_e8m0fnu:
            return torch.exp2(torch.ceil(torch.log2(scale)))
        return scale.to(self.scale_dtype).float()

    def encode(self, weight: str, value: Tensor, quant: Quantized | None = None) -> dict[str, Tensor]:
        if quant is not None:
            raise ArgumentError(f"{weight}: --format fp8 stores float8 weights; --wbits quantizes to integers (use "
                                "--format compressed-tensors or dense)")
        rows, cols = value.shape
        br, bc = self.block
        tr, tc = self.scale_shape((rows, cols))
        padded = torch.zeros(tr * br, tc * bc, dtype=torch.float32, device=value.device)
        padded[:rows, :cols] = value.float().abs()
        amax = padded.view(tr, br, tc, bc).amax(dim=(1, 3))  # (tile rows, tile columns)
        del padded
        scale = self.round_scale(torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)), self.dtype)
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=value.device)
        step = max(br, self.rows_at_once // br * br)
        for r in range(0, rows, step):
            s = self.tiles(scale[r // br : (r + step) // br + 1], min(step, rows - r), cols)
            q[r : r + step] = (value[r : r + step].float() / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        name, scale_name = self.names(weight)
        return {name: q, scale_name: scale.to(self.scale_dtype)}

    def quantization_config(self, ignore: Iterable[str]) -> dict[str, Any]:
        qc: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                              "weight_block_size": list(self.block), "modules_to_not_convert": sorted(set(ignore))}
        if self.scale_dtype == torch.float8_e8m0fnu:
            qc["scale_fmt"] = "ue8m0"
        return qc


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the FP4 (e2m1) magnitudes of codes 0-7; codes 8-15 are their negatives
MX_BLOCK = 32  # values per MXFP4 scale
E2M1_EMAX = 2  # the exponent of e2m1's largest value, 1.5 x 2^2
E8M0_NAN = 255


@dataclass(frozen=True)
class Mxfp4Format(OutputFormat):
    """OCP Microscaling FP4 (MXFP4), as gpt-oss's and DeepSeek-V4's routed experts are published: each run of 32
    input features of an output row shares one power-of-two scale. `<w>_blocks` (uint8 [..., out, in / 32, 16]: two
    e2m1 codes a byte, the lower nibble first) and `<w>_scales` (uint8 [..., out, in / 32], e8m0: 2^(s - 127)); W =
    code value x scale. Encoding takes each block's shared exponent floor(log2(amax)) - 2 (OCP MX: e2m1's largest
    exponent off that of the largest magnitude), divides by it, rounds to the nearest e2m1 value (ties to the even
    code) and saturates at 6; zeros stay exactly 0. Decoding is exact in any float dtype of the model (an e2m1 value
    times a power of two), as a loader that dequantizes computes it."""

    name: ClassVar[str] = "mxfp4"
    dtype: torch.dtype = torch.bfloat16  # the model's (decoded weights')
    rows_at_once: int = 4096  # rows decoded or encoded at a time: the temporaries stay small

    def names(self, weight: str) -> list[str]:
        return [weight + "_blocks", weight + "_scales"]

    def tensors(self, weight: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        *lead, rows, cols = shape
        if cols % MX_BLOCK:
            raise CheckpointError(f"{weight}: {cols} input features are not a multiple of {MX_BLOCK} (MXFP4 blocks)")
        blocks, scales = self.names(weight)
        return {blocks: (torch.uint8, (*lead, rows, cols // MX_BLOCK, MX_BLOCK // 2)),
                scales: (torch.uint8, (*lead, rows, cols // MX_BLOCK))}

    def stores(self, weight: str, tensors: Mapping[str, Any]) -> bool:
        return weight not in tensors and any(name in tensors for name in self.names(weight))

    def bound(self, dtype: torch.dtype, tensors: Mapping[str, Any]) -> OutputFormat:
        return dataclasses.replace(self, dtype=dtype)

    def decode(self, weight: str, stored: Mapping[str, Tensor]) -> Tensor:
        blocks, scales = (stored[n] for n in self.names(weight))
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != MX_BLOCK // 2 \
                or blocks.shape[:-1] != scales.shape:
            raise CheckpointError(f"{weight}: MXFP4 blocks {blocks.dtype} {list(blocks.shape)} and scales {scales.dtype} "
                                  f"{list(scales.shape)} do not fit (uint8 [..., rows, groups, 16] and [..., rows, groups])")
        if bool((scales == E8M0_NAN).any()):
            raise CheckpointError(f"{weight}_scales holds the e8m0 code 255 (NaN)")
        lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=blocks.device)
        *lead, rows, groups, _ = blocks.shape
        flat_blocks, flat_scales = blocks.reshape(-1, groups, MX_BLOCK // 2), scales.reshape(-1, groups)
        out = torch.empty(flat_blocks.shape[0], groups * MX_BLOCK, dtype=self.dtype, device=blocks.device)
        for r in range(0, flat_blocks.shape[0], self.rows_at_once):
            b = flat_blocks[r : r + self.rows_at_once]
            values = torch.stack((lut[(b & 0x0F).int()], lut[(b >> 4).int()]), dim=-1)  # (R, groups, 16, 2)
            scale = torch.exp2(flat_scales[r : r + self.rows_at_once].float() - 127)  # (R, groups)
            out[r : r + self.rows_at_once] = (values.reshape(b.shape[0], groups, MX_BLOCK) * scale[..., None]).reshape(
                b.shape[0], -1).to(self.dtype)
        return out.reshape(*lead, rows, groups * MX_BLOCK)

    def encode(self, weight: str, value: Tensor, quant: Quantized | None = None) -> dict[str, Tensor]:
        if quant is not None:
            raise ArgumentError(f"{weight}: --format mxfp4 stores FP4 values of its own scales; --wbits quantizes to "
                                "integers (use --format compressed-tensors or dense)")
        *lead, rows, cols = value.shape
        groups = cols // MX_BLOCK
        self.tensors(weight, value.dtype, tuple(value.shape))  # refuses a width that is no multiple of 32
        flat = value.reshape(-1, groups, MX_BLOCK)
        blocks = torch.empty(flat.shape[0], groups, MX_BLOCK // 2, dtype=torch.uint8, device=value.device)
        scales = torch.empty(flat.shape[0], groups, dtype=torch.uint8, device=value.device)
        midpoints = torch.tensor([(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])], dtype=torch.float32, device=value.device)
        for r in range(0, flat.shape[0], self.rows_at_once):
            v = flat[r : r + self.rows_at_once].float()  # (R, groups, 32)
            amax = v.abs().amax(dim=-1)
            exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - E2M1_EMAX, torch.full_like(amax, -127))
            code = (exponent + 127).clamp(0, E8M0_NAN - 1)
            scaled = (v.abs() / torch.exp2(code - 127)[..., None]).clamp(max=E2M1[-1])
            index = torch.bucketize(scaled, midpoints)  # nearest magnitude, a tie to the lower one...
            tie = (index < len(midpoints)) & (scaled == midpoints[index.clamp(max=len(midpoints) - 1)]) & (index % 2 == 1)
            index = index + tie.to(index.dtype)  # ...then to the even code
            nibble = (index + 8 * ((v < 0) & (index > 0)).to(index.dtype)).to(torch.uint8)  # no -0: a zero is code 0
            blocks[r : r + self.rows_at_once] = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
            scales[r : r + self.rows_at_once] = code.to(torch.uint8)
        name_blocks, name_scales = self.names(weight)
        return {name_blocks: blocks.reshape(*lead, rows, groups, MX_BLOCK // 2),
                name_scales: scales.reshape(*lead, rows, groups)}

    def quantization_config(self, ignore: Iterable[str]) -> dict[str, Any]:
        return {"quant_method": "mxfp4", "modules_to_not_convert": sorted(set(ignore))}


@dataclass(frozen=True)
class Layout:
    """How a checkpoint stores its tensors: the linear weights in `encoded` (by their dense names) as `format`
    stores them, the routed experts' linears in `fused` as pieces of their expert's slice of a fused tensor (see
    fused.py), every other tensor as itself. A checkpoint read has its own layout; a run writes its output in the
    layout of its format over the linears it prunes (the experts arranged as the input's), and replays its shards
    through the same one."""

    format: OutputFormat
    encoded: frozenset[str] = frozenset()
    fused: Mapping[str, Piece] = dataclasses.field(default_factory=dict)

    def encodes(self, name: str) -> bool:
        """Whether tensor `name` is stored in this layout's format rather than as itself."""
        return name in self.encoded and self.format.name != DenseFormat.name

    def stored(self, name: str) -> list[str]:
        """The stored tensors (or slices of them) that hold tensor `name`."""
        if name in self.fused:
            piece = self.fused[name]
            if self.encodes(name):  # the expert's slice of each of the format's parts
                return [slice_name(part, piece.expert) for part in self.format.names(piece.tensor)]
            return [piece.slice]
        return self.format.names(name) if name in self.encoded else [name]

    def meta(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        """The stored tensors of tensor `name`, whose dense form is `dtype` `shape`, with their dtypes and shapes (a
        fused expert's: the whole fused tensor, or its format's parts)."""
        if name in self.fused:
            piece = self.fused[name]
            if self.encodes(name):
                return self.format.tensors(piece.tensor, dtype, piece.shape)
            return {piece.tensor: (dtype, piece.stored_shape)}
        return self.format.tensors(name, dtype, shape) if name in self.encoded else {name: (dtype, tuple(shape))}

    def fused_tensors(self) -> set[str]:
        """The stored tensors that hold routed experts fused (a format's parts where it encodes them)."""
        return {part for name, piece in self.fused.items()
                for part in (self.format.names(piece.tensor) if self.encodes(name) else [piece.tensor])}

    def parts(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Meta]:
        """What `encode` gives for tensor `name`, with dtypes and shapes (a fused expert's linear: itself, a piece)."""
        return {name: (dtype, tuple(shape))} if name in self.fused else self.meta(name, dtype, shape)

    def encode(self, name: str, value: Tensor, quant: Quantized | None = None) -> dict[str, Tensor]:
        """The stored tensors of tensor `name`, whose value (the weight the run goes on with) is `value`; a fused
        expert's linear is a piece, put together with its expert's others when written (`assemble`), its value as the
        format will decode it."""
        if name in self.fused:
            if self.encodes(name):  # as it will decode: the formats that store fused experts encode row by row
                piece = self.fused[name]
                value = self.format.decode(piece.tensor, self.format.encode(piece.tensor, value, quant))
            return {name: value}
        return self.format.encode(name, value, quant) if name in self.encoded else {name: value}

    def weight(self, name: str, raw: Mapping[str, Tensor]) -> Tensor:
        """Tensor `name` as the run used it, from the stored tensors in `raw` (or its piece, as `encode` gave it)."""
        if name in self.fused:
            piece = self.fused[name]
            if name in raw:
                return raw[name]
            if self.encodes(name):  # the piece's rows of each part of the expert's slice, decoded
                return self.format.decode(piece.tensor, {
                    part: piece.take(raw[slice_name(part, piece.expert)], stored_dense=False)
                    for part in self.format.names(piece.tensor)})
            return piece.take(raw[piece.slice])
        return self.format.decode(name, raw) if name in self.encoded else raw[name]

    def assemble(self, pending: dict[str, Tensor]) -> dict[str, Tensor]:
        """The expert slices whose pieces (fused experts' linears, as `encode` gave them) are all in `pending`, as
        stored: those pieces are taken out of `pending`; the others wait there for their siblings."""
        slices: dict[str, list[str]] = {}
        for name in pending:
            slices.setdefault(self.fused[name].slice, []).append(name)
        out = {}
        for names in slices.values():
            pieces = [(self.fused[n], pending[n]) for n in names]
            value = join(pieces)
            if value is None:
                continue
            for n in names:
                del pending[n]
            piece = pieces[0][0]
            if self.encodes(names[0]):
                for part, t in self.format.encode(piece.tensor, value).items():
                    out[slice_name(part, piece.expert)] = t
            else:
                out[piece.slice] = value.T.contiguous() if piece.transposed else value.contiguous()
        return out


def write_quantization_config(out_dir: Path, fmt: OutputFormat, ignore: Iterable[str]) -> None:
    """Add the format's `quantization_config` (if any) to OUT_DIR/config.json, copied there from the input;
    without one (the dense format) the file stays byte for byte the input's."""
    qc = fmt.quantization_config(ignore)
    if qc is not None:
        update_config(out_dir, {"quantization_config": qc})


def update_config(out_dir: Path, changes: dict[str, Any], remove: Iterable[str] = ()) -> None:
    """Set the keys of `changes` in OUT_DIR/config.json (copied there from the input) and remove those of `remove`;
    with neither, the file stays byte for byte the input's."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    remove = [key for key in remove if key in config]
    if not changes and not remove:
        return
    config.update(changes)
    for key in remove:
        del config[key]
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


FORMATS = ("dense", "compressed-tensors", "fp8", "mxfp4")


def fp8_format_of(qc: Mapping[str, Any], where: str) -> Fp8BlockFormat:
    """The block-scaled FP8 format of a `quantization_config` with quant_method fp8."""
    if qc.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):  # DeepSeek-V3's name, MiniMax-M2's
        raise CheckpointError(f"{where}: fp8 weights in fmt {qc.get('fmt')!r} are not read; expected 'e4m3'")
    block = qc.get("weight_block_size")
    if block is None:
        raise CheckpointError(f"{where}: fp8 without weight_block_size (per-tensor or per-channel scales) is not "
                              "read; expected block scales, e.g. [128, 128]")
    if not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"{where}: weight_block_size {block!r} is not two positive integers")
    if qc.get("scale_fmt") not in (None, "ue8m0"):
        raise CheckpointError(f"{where}: scale_fmt {qc.get('scale_fmt')!r} is not read; expected ue8m0 or none")
    return Fp8BlockFormat(block=(block[0], block[1]))


def compressed_fp8_format_of(qc: Mapping[str, Any], where: str) -> Fp8BlockFormat:
    """compressed-tensors' float-quantized format with FP8 weights in block strategy (Mistral Large 3): DeepSeek-V3's
    block-scaled FP8 with the scale named `weight_scale`. Activations quantized dynamically, at run time, if at all:
    pruning leaves them to the loader."""
    groups = qc.get("config_groups")
    scheme = next(iter(groups.values())) if isinstance(groups, dict) and len(groups) == 1 else None
    w = scheme.get("weights") if isinstance(scheme, dict) else None
    block = w.get("block_structure") if isinstance(w, dict) else None
    act = scheme.get("input_activations") if isinstance(scheme, dict) else None
    if (not isinstance(w, dict) or w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") != "block"
            or not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)
            or not (act is None or isinstance(act, dict) and act.get("dynamic") is True)):
        raise CheckpointError(f"{where}: a compressed-tensors float-quantized config is read with one config group of "
                              f"8-bit float weights in blocks (block_structure) and dynamic or no activation "
                              f"quantization, got {scheme!r:.160}")
    return Fp8BlockFormat(block=(block[0], block[1]), scale_name="weight_scale")


@dataclass(frozen=True)
class ConfigGrid:
    """A grid read back from a `quantization_config`."""

    bits: int
    group_size: int
    sym: bool


def make_format(name: str, grid: GridArgs | None = None) -> OutputFormat:
    """The output format `name` (one of FORMATS) for a run quantized on `grid` (None: not quantized)."""
    if name == "dense":
        return DenseFormat()
    if name == "compressed-tensors":
        if grid is None:
            raise ArgumentError("--format compressed-tensors stores quantized weights; pass --wbits")
        return CompressedTensorsFormat(grid)
    if name == "fp8":
        if grid is not None:
            raise ArgumentError("--format fp8 stores float8 weights; --wbits quantizes to integers (use --format "
                                "compressed-tensors or dense)")
        return Fp8BlockFormat()
    if name == "mxfp4":
        if grid is not None:
            raise ArgumentError("--format mxfp4 stores FP4 values of its own scales; --wbits quantizes to integers (use "
                                "--format compressed-tensors or dense)")
        return Mxfp4Format()
    raise ArgumentError(f"format {name!r} is not one of {', '.join(FORMATS)}")


def format_of(config: Mapping[str, Any], where: str = "config.json") -> OutputFormat:
    """The format a checkpoint's linears are stored in, from its config.json's `quantization_config`."""
    qc = config.get("quantization_config")
    if qc is None:
        return DenseFormat()
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config {qc!r:.80} is not an object")
    method, fmt = qc.get("quant_method"), qc.get("format")
    if method == "fp8":
        return fp8_format_of(qc, where)
    if method == "mxfp4":
        return Mxfp4Format()
    if method == "compressed-tensors" and fmt == "float-quantized":
        return compressed_fp8_format_of(qc, where)
    if method != "compressed-tensors" or fmt != "pack-quantized":
        raise CheckpointError(f"{where}: quantization_config with quant_method {method!r} and format {fmt!r} is not "
                              "supported; streamprune reads unquantized, fp8 (block scales), mxfp4 and "
                              "compressed-tensors pack-quantized checkpoints")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(f"{where}: streamprune reads a compressed-tensors config with one config group, "
                              f"found {len(groups) if isinstance(groups, dict) else groups!r}")
    scheme = next(iter(groups.values()))
    w = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(w, dict) or w.get("type", "int") != "int" or scheme.get("input_activations") is not None:
        raise CheckpointError(f"{where}: only weight-only integer quantization is read, got {scheme!r:.120}")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise CheckpointError(f"{where}: weight strategy {strategy!r} is not read; expected 'group' or 'channel'")
    group_size = -1 if strategy == "channel" else int(w["group_size"])
    try:
        return CompressedTensorsFormat(ConfigGrid(int(w["num_bits"]), group_size, bool(w.get("symmetric", True))))
    except ArgumentError as e:
        raise CheckpointError(f"{where}: {e}") from e

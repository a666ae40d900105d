"""Predicting a run's peak host and device memory from the checkpoint's headers alone.

The model (see README, "Memory model"): at any moment the process holds a fixed overhead (the
Python interpreter, torch and streamprune), the block being pruned as read plus the next block read
ahead, the block's float32 working copy, the Hessian workspace of the input being pruned, the
forward workspace of one batch of windows, and the two calibration activation buffers wherever
they are placed. Embedding and head tensors are handled one at a time before and after the blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from streamprune.activations import choose_placement
from streamprune.arch import PRUNABLE, SEQUENTIAL, Role
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError
from streamprune.memory import resolve_device

# RSS of a process that has imported torch and streamprune and started a run (measured on Linux x86-64).
HOST_OVERHEAD = 250 * 2**20
# d x d float32 matrices held at the peak of one input's solve: SparseGPT holds the Hessian and two of
# its Cholesky factor, the inverse and the inverse's factor at a time; the others only X^T X.
HESSIAN_MATRICES = {"sparsegpt": 3, "wanda": 1, "magnitude": 1}
# Float32 temporaries of one batch in the block forward, in units of (batch * seqlen * width).
FORWARD_HIDDEN_COPIES = 8
FORWARD_FFN_COPIES = 3


@dataclass
class MemoryPlan:
    placement: str
    batch: int  # windows per forward call, after fitting the GPU budget
    host_peak: int
    device_peak: int
    consumers: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, where)

    def to_dict(self) -> dict[str, object]:
        return {"placement": self.placement, "batch": self.batch, "host_peak_bytes": self.host_peak, "device_peak_bytes": self.device_peak,
                "consumers": [{"what": w, "bytes": b, "where": p} for w, b, p in self.consumers]}


@dataclass
class Footprint:
    """Sizes in bytes that a run's memory is made of (see the module docstring)."""

    raw_block: int  # one block as stored (also its copy on a GPU; on the CPU the same tensors)
    pruned_stored: int  # the pruned weights as stored, awaiting the write
    solve: int  # Hessian and solver workspace of the largest input
    per_window: int  # forward workspace of one calibration window
    act_pair: int  # the two activation buffers
    embed_stored: int  # the token embedding as stored
    embed_fp32: int  # and in float32


def footprint(ckpt: Checkpoint, nsamples: int, seqlen: int, method: str = "sparsegpt", sequential: bool = True,
              calibrate: bool = True) -> Footprint:
    cfg = ckpt.config
    block0 = [ckpt.tensors[n] for n in ckpt.stored_names(0)]
    linears = {role: ckpt.tensors[ckpt.names[((role, "weight"), 0)]] for role in PRUNABLE
               if ((role, "weight"), 0) in ckpt.names}
    widths = [max(linears[r].shape[1] for r in roles if r in linears) for _, roles in SEQUENTIAL
              if any(r in linears for r in roles)]
    largest = max(math.prod(i.shape) for i in linears.values())
    matrices = HESSIAN_MATRICES[method]
    if not calibrate:
        solve, per_window, act_pair = 4 * largest * 4, 0, 0
    else:
        if sequential:
            hessians = matrices * max(widths) ** 2 * 4
        else:
            hessians = sum(w * w * 4 for w in widths) + (matrices - 1) * max(widths) ** 2 * 4
        solve = hessians + 6 * largest * 4  # the largest linear: new weight, scores, top-k indices, error terms
        width = max(cfg.hidden_size, cfg.n_heads * cfg.head_dim)
        per_window = (FORWARD_HIDDEN_COPIES * width + FORWARD_FFN_COPIES * cfg.ffn_dim) * seqlen * 4
        solve = max(solve, hessians + largest * 4)  # the forward upcasts one linear at a time
        if cfg.pos == "alibi":
            per_window += 2 * cfg.n_heads * seqlen * seqlen * 4
        act_pair = 2 * nsamples * seqlen * cfg.hidden_size * 4
    embed = ckpt.tensors[ckpt.names[((Role.TOKEN_EMBD, "weight"), None)]]
    return Footprint(
        raw_block=sum(i.nbytes for i in block0),
        pruned_stored=sum(i.nbytes for i in linears.values()),
        solve=solve, per_window=per_window, act_pair=act_pair,
        embed_stored=embed.nbytes, embed_fp32=math.prod(embed.shape) * 4)


def decide(fp: Footprint, device: torch.device, offload_activations: str, max_gpu_memory: int | None,
           batch: int, nsamples: int) -> tuple[str, int]:
    """Activation placement and windows per forward call under the GPU budget.

    The budget is 90% of `max_gpu_memory` (default: the card's memory). The block's float32 copy and
    the solver workspace come first; the activations go to the device only if they fit beside the
    forward workspace of one window; the batch then shrinks until its workspace fits what is left.
    """
    batch = max(1, min(batch, nsamples))
    host_budget = psutil.virtual_memory().available // 2
    if device.type != "cuda":
        return choose_placement(offload_activations, fp.act_pair, device, None, host_budget), batch
    total = max_gpu_memory or torch.cuda.get_device_properties(device).total_memory
    free = int(total * 0.9) - fp.raw_block - fp.solve
    if free < fp.per_window:
        raise ArgumentError(
            f"{total / 2**30:.1f} GiB of GPU memory cannot hold one block: its weights "
            f"({fp.raw_block / 2**30:.1f} GiB), the solver workspace ({fp.solve / 2**30:.1f} GiB) and the forward "
            f"workspace of one window ({fp.per_window / 2**30:.2f} GiB) need "
            f"{(fp.raw_block + fp.solve + fp.per_window) / 0.9 / 2**30:.1f} GiB; use --device cpu or a larger card"
        )
    placement = choose_placement(offload_activations, fp.act_pair, device, free - fp.per_window, host_budget)
    if placement == "device":
        free -= fp.act_pair
    if fp.per_window:
        batch = max(1, min(batch, free // fp.per_window))
    return placement, batch


def plan(model_dir: str | Path, nsamples: int = 128, seqlen: int | None = None, device: str = "auto",
         offload_activations: str = "auto", max_gpu_memory: int | None = None, method: str = "sparsegpt",
         batch: int = 8, sequential: bool = True, calibrate: bool = True) -> MemoryPlan:
    """Predicted peak memory of `streamprune run` with these arguments; nothing is run or allocated.

    Args:
        model_dir: the checkpoint to prune.
        nsamples, seqlen, batch: calibration windows, their length, windows per forward call.
        device, offload_activations, max_gpu_memory: as for `streamprune run`.
        method, sequential: as for `streamprune run`.
        calibrate: False for magnitude pruning without calibration data.
    """
    ckpt = Checkpoint(model_dir)
    dev = resolve_device(device)
    seqlen = ckpt.config.default_seqlen if seqlen is None else seqlen
    fp = footprint(ckpt, nsamples, seqlen, method, sequential, calibrate)
    placement, batch = decide(fp, dev, offload_activations, max_gpu_memory, batch, nsamples)
    on_device = dev.type == "cuda"
    where_compute = "device" if on_device else "host"
    where_act = {"device": where_compute, "cpu": "host", "disk": "disk"}[placement]
    block_consumers = [
        ("block as read, and the next one read ahead", 2 * fp.raw_block, "host"),
        ("pruned weights awaiting the write", fp.pruned_stored, "host"),
        ("block weights on the GPU", fp.raw_block if on_device else 0, "device"),
        ("Hessian and solver workspace", fp.solve, where_compute),
        (f"forward workspace of one batch ({batch} windows)", batch * fp.per_window, where_compute),
        ("calibration activations (input and output buffers)", fp.act_pair, where_act),
    ]
    block_phase = {"host": 0, "device": 0, "disk": 0}
    for _what, nbytes, where in block_consumers:
        block_phase[where] += nbytes
    embed_phase = {"host": fp.embed_stored, "device": 0, "disk": 0}
    embed_phase[where_compute] += fp.embed_fp32
    embed_phase[where_act] += fp.act_pair
    host = HOST_OVERHEAD + max(block_phase["host"], embed_phase["host"])
    device_peak = max(block_phase["device"], embed_phase["device"]) if on_device else 0
    consumers = [("fixed overhead (interpreter, torch)", HOST_OVERHEAD, "host"), *block_consumers,
                 ("token embedding while embedding windows", fp.embed_stored + fp.embed_fp32, where_compute)]
    consumers.sort(key=lambda c: -c[1])
    return MemoryPlan(placement, batch, host, device_peak, consumers)

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
    host_peak: int
    device_peak: int
    consumers: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, where)

    def to_dict(self) -> dict[str, object]:
        return {"placement": self.placement, "host_peak_bytes": self.host_peak, "device_peak_bytes": self.device_peak,
                "consumers": [{"what": w, "bytes": b, "where": p} for w, b, p in self.consumers]}


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
    cfg = ckpt.config
    dev = resolve_device(device)
    seqlen = cfg.default_seqlen if seqlen is None else seqlen
    block0 = [ckpt.tensors[n] for n in ckpt.stored_names(0)]
    raw_block = sum(i.nbytes for i in block0)
    batch = min(batch, nsamples)
    fp32_block = sum(math.prod(i.shape) * 4 for i in block0)
    linears = {role: ckpt.tensors[ckpt.names[((role, "weight"), 0)]].shape
               for role in PRUNABLE if ((role, "weight"), 0) in ckpt.names}
    widths = [max(linears[r][1] for r in roles if r in linears) for _, roles in SEQUENTIAL
              if any(r in linears for r in roles)]
    largest = max(rows * cols for rows, cols in linears.values())
    matrices = HESSIAN_MATRICES[method]
    if calibrate:
        if sequential:
            hessians = matrices * max(widths) ** 2 * 4
        else:
            hessians = sum(w * w * 4 for w in widths) + (matrices - 1) * max(widths) ** 2 * 4
        solve = hessians + 6 * largest * 4  # the largest linear: new weight, scores, top-k indices, error terms
        act_pair = 2 * nsamples * seqlen * cfg.hidden_size * 4
        width = max(cfg.hidden_size, cfg.n_heads * cfg.head_dim)
        forward = (FORWARD_HIDDEN_COPIES * width + FORWARD_FFN_COPIES * cfg.ffn_dim) * batch * seqlen * 4
        if cfg.pos == "alibi":
            forward += 2 * batch * cfg.n_heads * seqlen * seqlen * 4
    else:
        solve = 4 * largest * 4
        act_pair = forward = 0
    embed_info = ckpt.tensors[ckpt.names[((Role.TOKEN_EMBD, "weight"), None)]]
    embed_itemsize = embed_info.torch_dtype.itemsize
    embed = embed_info.nbytes + math.prod(embed_info.shape) * 4  # as read, and in float32

    budget = None
    if dev.type == "cuda":
        total = max_gpu_memory or torch.cuda.get_device_properties(dev).total_memory
        budget = int(total * 0.9) - 2 * fp32_block * 2
    placement = choose_placement(offload_activations, act_pair, dev, budget, psutil.virtual_memory().available // 2)
    on_device = dev.type == "cuda"
    where_compute = "device" if on_device else "host"
    where_act = {"device": where_compute, "cpu": "host", "disk": "disk"}[placement]

    consumers = [
        ("fixed overhead (interpreter, torch)", HOST_OVERHEAD, "host"),
        ("block as read, and the next one read ahead", 2 * raw_block, "host"),
        ("pruned weights awaiting the write", sum(r * c for r, c in linears.values()) * embed_itemsize, "host"),
        ("block weights in float32", fp32_block, where_compute),
        ("Hessian and solver workspace", solve, where_compute),
        ("forward workspace of one batch", forward, where_compute),
        ("calibration activations (input and output buffers)", act_pair, where_act),
        ("token embedding while embedding windows", embed, where_compute),
    ]
    block_phase = {"host": 0, "device": 0}
    for _what, nbytes, where in consumers[1:7]:
        if where in block_phase:
            block_phase[where] += nbytes
    embed_phase = {"host": embed_info.nbytes, "device": 0}
    embed_phase[where_compute] += math.prod(embed_info.shape) * 4
    if where_act in embed_phase:
        embed_phase[where_act] += act_pair
    host = HOST_OVERHEAD + max(block_phase["host"], embed_phase["host"])
    device_peak = max(block_phase["device"], embed_phase["device"]) if on_device else 0
    consumers.sort(key=lambda c: -c[1])
    return MemoryPlan(placement, host, device_peak, consumers)

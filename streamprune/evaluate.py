"""Streaming perplexity: embed, then one block in memory at a time, then the head."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import Progress
from torch import Tensor

from streamprune.arch.block import positions
from streamprune.calib import eval_windows, load_tokens
from streamprune.checkpoint import Checkpoint
from streamprune.activations import Activations
from streamprune.arch.block import head
from streamprune.forward import embed_windows, forward_block, head_nll, head_weights
from streamprune.memory import PeakMemory, os_peak_rss, resolve_device

logger = logging.getLogger(__name__)

EVAL_BATCH = 4  # windows per forward call


@dataclass
class EvalResult:
    model: str
    data: str
    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    device: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def final_hidden(ckpt: Checkpoint, windows: Tensor, device: torch.device, progress: bool = False) -> Activations:
    """Hidden states after the last block for (K, T) token windows, streaming the blocks."""
    cfg = ckpt.config
    K, T = windows.shape
    x = Activations((K, T, cfg.hidden_size), device)
    embed_windows(ckpt, windows, device, x, EVAL_BATCH)
    pos = positions(cfg, T).to(device, torch.float32)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("blocks", total=cfg.n_layers)
        for bid in range(cfg.n_layers):
            w = ckpt.load_block(bid, device)
            forward_block(ckpt, w, x, pos, x, EVAL_BATCH, device)  # in place: windows are independent
            del w
            bar.advance(task)
    return x


def logits(model_dir: str | Path, ids: Tensor, device: str = "cpu") -> Tensor:
    """Logits (B, T, vocab) of token ids (B, T), computed block by block."""
    ckpt = Checkpoint(model_dir)
    dev = resolve_device(device)
    with torch.no_grad():
        return head(ckpt.config, head_weights(ckpt, dev), final_hidden(ckpt, ids, dev).data)


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    seqlen: int | None = None,
    nsamples: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> EvalResult:
    """Perplexity of a checkpoint on a local data file, holding one block's weights at a time.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors, tokenizer.json).
        data: plain text, .jsonl with a "text" field, or .npy token ids.
        seqlen: window length; default is the model's maximum positions capped at 2048.
        nsamples: use at most this many windows (from the start of the data).
        device: "auto", "cpu" or "cuda".
        progress: show a progress bar over blocks.
    """
    start = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    seqlen = cfg.default_seqlen if seqlen is None else seqlen
    cfg.check_seqlen(seqlen)
    dev = resolve_device(device)
    tokens = load_tokens(data, model_dir, cfg.vocab_size)
    windows = eval_windows(tokens, seqlen, nsamples, source=str(data))
    with PeakMemory(dev) as mem:
        x = final_hidden(ckpt, windows, dev, progress)
        total, count = head_nll(ckpt, x, windows, dev)
    nll = total / count
    return EvalResult(
        model=str(model_dir),
        data=str(data),
        perplexity=math.exp(nll),
        nll=nll,
        tokens=count,
        windows=windows.shape[0],
        seqlen=seqlen,
        device=str(dev),
        seconds=time.perf_counter() - start,
        peak_rss_bytes=max(mem.peak_rss, os_peak_rss()),
        peak_gpu_bytes=mem.peak_gpu,
    )

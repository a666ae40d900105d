"""Streaming perplexity: embed, then one block in memory at a time, then the head."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamprune.activations import Activations, make_store
from streamprune.arch.block import head
from streamprune.calib import eval_windows, load_tokens
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError
from streamprune.forward import head_nll, head_weights
from streamprune.hidden import HiddenStream
from streamprune.loop import Status, tracked, walk
from streamprune.memory import PeakMemory, os_peak_rss, resolve_device
from streamprune.options import EvalOptions
from streamprune.plan import decide, eval_footprint, eval_sizes
from streamprune.stream import BlockStream

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    model: str
    data: str | None  # the perplexity's data file (None: tasks only)
    perplexity: float | None
    nll: float | None  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seqlen: int
    device: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    offload_activations: str = "device"  # where the windows' hidden states lived: device, cpu or disk
    batch: int = 8  # windows per forward call
    tasks: dict[str, Any] | None = None  # --tasks: what lm-eval's simple_evaluate returns (as JSON holds it)
    task_sequences: int = 0  # --tasks: the token sequences scored (each request's, once)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def final_hidden(ckpt: Checkpoint, windows: Tensor, device: torch.device, store: Activations, batch: int,
                 scratch: Activations | None = None, status: Status | None = None) -> Activations:
    """Hidden states after the last block for (K, T) token windows, in `store` (K, T, D), one block at a time (see
    `HiddenStream`; `scratch` is needed for MoE models). Returns the buffer that holds the result."""
    stream = HiddenStream(ckpt, windows, device, batch, store, scratch)
    walk(BlockStream(ckpt, device, range(ckpt.config.n_layers)), [stream], status)
    return stream.x


def logits(model_dir: str | Path, ids: Tensor, device: str = "cpu", batch: int = 8) -> Tensor:
    """Logits (B, T, vocab) of token ids (B, T), computed block by block."""
    ckpt = Checkpoint(model_dir)
    dev = resolve_device(device)
    shape = (*ids.shape, ckpt.config.hidden_size)
    scratch = Activations(shape, dev) if ckpt.config.n_experts else None
    store = final_hidden(ckpt, ids, dev, Activations(shape, dev), batch, scratch=scratch)
    with torch.no_grad():
        return head(ckpt.config, head_weights(ckpt, dev), store.data)


def evaluate(model_dir: str | Path, data: str | Path | None = None, progress: bool = False,
             **options: Any) -> EvalResult:
    """Perplexity of a checkpoint on a local data file, and/or its scores on lm-evaluation-harness tasks, holding one
    block's weights at a time; both in one pass.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors, tokenizer.json).
        data: plain text, .jsonl with a "text" field, or .npy token ids (None: tasks only).
        progress: show a progress bar over blocks.
        **options: fields of `streamprune.options.EvalOptions`: seqlen (default: the model's maximum positions
            capped at 2048), nsamples (at most this many windows, from the start of the data), tasks (lm-eval task
            names; with include_path, num_fewshot, limit as lm-eval takes them), device, batch,
            offload_activations, max_gpu_memory (as for `prune`: the hidden states live on the device when they
            fit, else in host memory, else in a temporary file in $TMPDIR; the batch shrinks to fit the GPU
            budget).

    Returns:
        An `EvalResult`: perplexity, mean NLL, predicted tokens, windows, seqlen, the tasks' results as lm-eval
        returns them, time, peak memory, and the placement and batch used.
    """
    start = time.perf_counter()
    opts = EvalOptions.of(options)
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    if data is None and not opts.tasks:
        raise ArgumentError("eval needs --data FILE, --tasks NAMES, or both")
    seqlen = cfg.default_seqlen if opts.seqlen is None else opts.seqlen
    dev = resolve_device(opts.device)
    windows = None
    if data is not None:
        cfg.check_seqlen(seqlen)
        windows = eval_windows(load_tokens(data, model_dir, cfg.vocab_size), seqlen, opts.nsamples, source=str(data))
    tasks, wanted = None, {}
    if opts.tasks:
        from streamprune.tasks import prepare_tasks  # lm-eval, only when tasks are asked for

        tasks = prepare_tasks(ckpt, opts.tasks, opts.include_path, opts.num_fewshot, opts.limit)
        wanted = tasks.record()
    K, T, _ = eval_sizes(windows, False, wanted)
    decision = decide(eval_footprint(ckpt, K, T), dev, opts.offload_activations, opts.max_gpu_memory, opts.batch, K)
    with tempfile.TemporaryDirectory(prefix="streamprune-eval-") as work, PeakMemory(dev) as mem, \
            tracked(mem, cfg.n_layers, progress=progress) as status:
        consumers: list[HiddenStream] = []
        if windows is not None:
            stores = [make_store((windows.shape[0], seqlen, cfg.hidden_size), decision.placement, dev, Path(work),
                                 f"hidden{i}") for i in range(2 if cfg.n_experts else 1)]
            consumers.append(HiddenStream(ckpt, windows, dev, decision.batch, *stores))
        scoring = None
        if tasks is not None:
            from streamprune.tasks import TaskStreams

            scoring = TaskStreams(ckpt, wanted, dev, decision.batch, decision.placement, Path(work))
            consumers += scoring.streams
        try:
            walk(BlockStream(ckpt, dev, range(cfg.n_layers)), list(consumers), status)
            total, count = head_nll(ckpt, consumers[0].x, windows, dev) if windows is not None else (0.0, 0)
            scores = scoring.scores() if scoring is not None else {}
        finally:
            for stream in consumers:
                stream.close()
    results = None if tasks is None else tasks.answer(scores)
    nll = total / count if count else None
    return EvalResult(model=str(model_dir), data=None if data is None else str(data),
                      perplexity=None if nll is None else math.exp(nll), nll=nll, tokens=count,
                      windows=0 if windows is None else windows.shape[0], seqlen=seqlen if windows is not None else 0,
                      device=str(dev), seconds=time.perf_counter() - start,
                      peak_rss_bytes=max(mem.peak_rss, os_peak_rss()), peak_gpu_bytes=mem.peak_gpu,
                      offload_activations=decision.placement, batch=decision.batch,
                      tasks=None if results is None else to_json(results), task_sequences=len(wanted))


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    from streamprune.tasks import to_json as convert

    return convert(results)

"""The streaming loop: embed -> for each block: read, calibrate, prune, forward, write.

Only one decoder block's weights are held at a time. The calibration hidden states live in two
buffers (block input and block output) that swap roles after each block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from streamprune.arch import PRUNABLE, SEQUENTIAL, Param, Role, Site
from streamprune.arch.block import Positions, positions
from streamprune.calib import calib_windows, load_tokens
from streamprune.checkpoint import INDEX_NAME, Checkpoint, ShardWriter, copy_side_files
from streamprune.errors import ArgumentError, DataError
from streamprune.forward import embed_windows, forward_block
from streamprune.memory import PeakMemory, os_peak_rss, resolve_device
from streamprune.pruners import METHODS, Pattern, Pruner, make_pruner, resolve_sparsity
from streamprune.pruners.masks import check_columns
from streamprune.report import REPORT_NAME, LayerReport, Report

logger = logging.getLogger(__name__)


@dataclass
class PruneOptions:
    """Arguments of a pruning run; see `prune` for their meaning."""

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    calib: str | Path | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    device: str = "auto"
    sequential: bool = True
    blocksize: int = 128
    damp: float = 0.01
    batch: int = 8
    overwrite: bool = False


def check_out_dir(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Refuse an output inside the input, a non-empty one (unless `overwrite`), or an unwritable one."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src or dst.is_relative_to(src):
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is inside MODEL_DIR {str(model_dir)!r}; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is not empty; pass --overwrite to replace its checkpoint")
    parent = dst if dst.exists() else next(p for p in dst.parents if p.exists())
    probe = parent / ".streamprune-write-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is not writable ({e.strerror or e})") from e


def clear_previous_output(out_dir: Path) -> None:
    """Remove a previous run's checkpoint files (only those), so no stale shard survives."""
    for path in out_dir.iterdir():
        if path.is_file() and (path.suffix in (".safetensors", ".tmp") or path.name in (INDEX_NAME, REPORT_NAME)):
            path.unlink()


class BlockPruner:
    """Prunes the linears of one block, site by site in the order of SEQUENTIAL."""

    def __init__(self, ckpt: Checkpoint, opts: PruneOptions, sparsity: float, pattern: Pattern,
                 device: torch.device, report: Report) -> None:
        self.ckpt, self.opts, self.sparsity, self.pattern = ckpt, opts, sparsity, pattern
        self.device, self.report = device, report

    def groups(self, w: dict[Param, Tensor]) -> list[tuple[Site, list[Role]]]:
        return [(site, [r for r in roles if (r, "weight") in w]) for site, roles in SEQUENTIAL
                if any((r, "weight") in w for r in roles)]

    def new_pruner(self, w: dict[Param, Tensor], roles: list[Role]) -> Pruner:
        columns = w[(roles[0], "weight")].shape[1]
        return make_pruner(self.opts.method, columns, self.device, self.sparsity, self.pattern,
                           blocksize=self.opts.blocksize, damp=self.opts.damp)

    def run(self, bid: int, w: dict[Param, Tensor], x: Tensor | None, scratch: Tensor | None,
            pos: Positions | None) -> dict[str, Tensor]:
        """Prune every linear of block `bid` in place in `w`; return the saved tensors by name."""
        groups = self.groups(w)
        saved: dict[str, Tensor] = {}
        if x is None:  # magnitude without calibration data: no statistics needed
            for site, roles in groups:
                self.prune_roles(bid, w, self.new_pruner(w, roles), roles, saved)
            return saved
        assert scratch is not None and pos is not None
        if self.opts.sequential:
            for site, roles in groups:
                pruner = self.new_pruner(w, roles)
                self.calibrate(w, x, scratch, pos, {site: pruner})
                self.prune_roles(bid, w, pruner, roles, saved)
        else:
            pruners = {site: self.new_pruner(w, roles) for site, roles in groups}
            self.calibrate(w, x, scratch, pos, pruners)
            for site, roles in groups:
                self.prune_roles(bid, w, pruners[site], roles, saved)
        return saved

    def calibrate(self, w: dict[Param, Tensor], x: Tensor, scratch: Tensor, pos: Positions,
                  pruners: dict[Site, Pruner]) -> None:
        """One forward over the calibration windows, feeding each watched site's input to its pruner."""
        start = time.perf_counter()

        def tap(site: Site, a: Tensor) -> None:
            if site in pruners:
                pruners[site].add_batch(a)

        last = [site for site, _ in SEQUENTIAL if site in pruners][-1]  # stop the pass there
        forward_block(self.ckpt, w, x, pos, scratch, self.opts.batch, tap=tap, device=self.device, until=last)
        self.report.phases["calibrate"] += time.perf_counter() - start

    def prune_roles(self, bid: int, w: dict[Param, Tensor], pruner: Pruner, roles: list[Role],
                    saved: dict[str, Tensor]) -> None:
        for role in roles:
            start = time.perf_counter()
            name = self.ckpt.names[((role, "weight"), bid)]
            dtype = self.ckpt.tensors[name].torch_dtype
            dense = w[(role, "weight")]
            result = pruner.prune(dense)
            stored = result.weight.to(dtype)  # exactly what is written, and what later layers see
            pruned = stored.to(self.device, torch.float32)
            err = pruner.reconstruction_error(dense, pruned)
            w[(role, "weight")] = pruned
            saved[name] = stored.cpu()
            seconds = time.perf_counter() - start
            self.report.phases["solve"] += seconds
            self.report.layers.append(LayerReport(
                block=bid, role=role.value, name=name, shape=list(stored.shape),
                sparsity=float((stored == 0).sum()) / stored.numel(), rel_error=err, seconds=seconds,
                damp=result.info.get("damp"), damp_retries=int(result.info.get("damp_retries", 0))))
        pruner.free()


def prune(model_dir: str | Path, out_dir: str | Path, progress: bool = False, **options: object) -> Report:
    """Prune a checkpoint block by block and write the result as an ordinary checkpoint.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors shards, tokenizer.json).
        out_dir: where the pruned checkpoint goes; must not be inside `model_dir`.
        progress: show a progress bar per block.
        **options: fields of `PruneOptions`:
            method: "sparsegpt", "wanda" or "magnitude".
            sparsity: fraction of weights to remove per matrix, in [0, 1) (default 0.5; implied by N:M).
            pattern: "unstructured" or "N:M" (e.g. "2:4", "4:8").
            calib: calibration data (.txt, .jsonl with "text", or .npy token ids); optional for magnitude.
            nsamples, seqlen, seed: calibration windows (count, length, random seed).
            device: "auto", "cpu" or "cuda".
            sequential: compute later sub-layers' statistics from already pruned earlier ones.
            blocksize, damp: SparseGPT's column block size and relative Hessian damping.
            batch: calibration windows per forward call.
            overwrite: replace the checkpoint files of a non-empty OUT_DIR.

    Returns:
        The run report, also saved as OUT_DIR/streamprune_report.json.
    """
    unknown = set(options) - set(PruneOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    opts = PruneOptions(**options)  # type: ignore[arg-type]
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    start = time.perf_counter()

    # Everything is validated before the first byte is written.
    if opts.method not in METHODS:
        raise ArgumentError(f"method {opts.method!r} is not one of {', '.join(METHODS)}")
    pattern = Pattern.parse(opts.pattern)
    sparsity = resolve_sparsity(opts.sparsity, pattern)
    if opts.blocksize < 1 or (pattern.structured and opts.blocksize % pattern.m):
        raise ArgumentError(f"blocksize {opts.blocksize!r} must be a positive multiple of M={pattern.m or 1}")
    if not opts.damp > 0:
        raise ArgumentError(f"damp {opts.damp!r} must be positive")
    if opts.batch < 1:
        raise ArgumentError(f"batch {opts.batch!r} must be at least 1")
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    for (param, bid), name in ckpt.names.items():
        if param[0] in PRUNABLE and param[1] == "weight" and bid == 0:
            check_columns(ckpt.tensors[name].shape[1], pattern, name)
    device = resolve_device(opts.device)
    windows = None
    seqlen = opts.seqlen or cfg.default_seqlen
    if opts.calib is not None:
        cfg.check_seqlen(seqlen)
        tokens = load_tokens(opts.calib, model_dir, cfg.vocab_size)
        windows = calib_windows(tokens, seqlen, opts.nsamples, opts.seed, source=str(opts.calib))
    elif METHODS[opts.method].needs_data:
        raise DataError(f"method {opts.method!r} needs calibration data: pass --calib FILE")
    check_out_dir(model_dir, out_dir, opts.overwrite)

    out_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_output(out_dir)
    args = {**asdict(opts), "sparsity": sparsity, "pattern": str(pattern), "seqlen": seqlen,
            "calib": None if opts.calib is None else str(opts.calib), "device": str(device)}
    report = Report(args=args, model={"dir": str(model_dir), "model_type": cfg.model_type,
                                      "n_layers": cfg.n_layers, "dtype": str(ckpt.dtype).removeprefix("torch.")})
    writer = ShardWriter(out_dir, cfg.n_layers + 1)
    block_pruner = BlockPruner(ckpt, opts, sparsity, pattern, device, report)

    with PeakMemory(device) as mem, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
        TimeElapsedColumn(), disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("globals", total=cfg.n_layers)
        t = time.perf_counter()
        writer.write(0, {name: ckpt.read(name) for name in ckpt.stored_names(None)})  # copied bit for bit
        report.phases["write"] += time.perf_counter() - t

        x = scratch = pos = None
        if windows is not None:
            x = torch.empty(windows.shape[0], seqlen, cfg.hidden_size, device=device)
            scratch = torch.empty_like(x)
            embed_windows(ckpt, windows, device, x, opts.batch)
            pos = positions(cfg, seqlen).to(device, torch.float32)

        for bid in range(cfg.n_layers):
            bar.update(task, description=f"block {bid}: read")
            t = time.perf_counter()
            raw = {name: ckpt.read(name) for name in ckpt.stored_names(bid)}
            w = {param: raw[name].to(device, torch.float32) for (param, b), name in ckpt.names.items() if b == bid}
            report.phases["read"] += time.perf_counter() - t

            bar.update(task, description=f"block {bid}: prune")
            raw.update(block_pruner.run(bid, w, x, scratch, pos))

            if x is not None:
                assert scratch is not None and pos is not None
                bar.update(task, description=f"block {bid}: forward")
                t = time.perf_counter()
                forward_block(ckpt, w, x, pos, scratch, opts.batch, device=device)
                x, scratch = scratch, x  # this block's outputs are the next block's inputs
                report.phases["forward"] += time.perf_counter() - t

            bar.update(task, description=f"block {bid}: write")
            t = time.perf_counter()
            writer.write(bid + 1, raw)
            del raw, w
            report.phases["write"] += time.perf_counter() - t
            bar.advance(task)

        copy_side_files(model_dir, out_dir)
        writer.finish()  # the index last: until now OUT_DIR does not load as a checkpoint

    pruned = sum(lr.shape[0] * lr.shape[1] for lr in report.layers)
    zeros = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in report.layers)
    report.total_sparsity = zeros / pruned if pruned else 0.0
    report.wall_seconds = time.perf_counter() - start
    report.peak_rss_bytes = max(mem.peak_rss, 0)
    report.process_peak_rss_bytes = os_peak_rss()
    report.peak_gpu_bytes = mem.peak_gpu
    report.save(out_dir)
    return report

"""The streaming loop: embed -> for each block: read, calibrate, prune, forward, write.

Only one decoder block's weights are held at a time (plus the next one, read ahead in a
background thread). The calibration hidden states live in two buffers (block input and block
output) that swap roles after each block. Progress is journaled per shard, so a rerun of the
same command resumes at the first unfinished block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from streamprune.activations import Activations, make_store
from streamprune.arch import EXPERT_SEQUENTIAL, PRUNABLE, SEQUENTIAL, ModelConfig, Param, Role, Site
from streamprune.arch.block import LayerPositions, Positions, expert_hidden, positions
from streamprune.calib import calib_windows
from streamprune.checkpoint import INDEX_NAME, Checkpoint
from streamprune.dist import Ranks
from streamprune.errors import ArgumentError, DataError, StreamPruneError
from streamprune.formats import Layout, make_format, write_quantization_config
from streamprune.forward import Routes, add_expert, embed_windows, forward_block, routed_rows
from streamprune.journal import WORK_DIR, Journal, calib_digest, describe_difference, environment, fingerprint
from streamprune.memory import (
    PeakMemory,
    os_peak_rss,
    release_freed_memory,
    resolve_device,
)
from streamprune.pruners import Pattern, Pruner, default_errors, make_pruner, method, resolve_sparsity
from streamprune.evaluate import HiddenStream
from streamprune.owl import (ALLOCATIONS, OWL_LAMBDA, OWL_M, Allocation, allocate, block_linears, dense_outlier_ratios,
                             linear_zeros, pruned_counts)
from streamprune.plan import decide, eval_sizes, footprint, run_eval_windows
from streamprune.pruners.masks import check_columns
from streamprune.pruners.quant import Grid, check_group_size
from streamprune.report import REPORT_NAME, LayerReport, Report, quantization_summary
from streamprune.stream import Block, BlockStream, Part, Raw
from streamprune.tensorfile import ShardFile, all_finite, read_header, read_tensor
from streamprune.writer import ShardWriter, copy_side_files, eager

logger = logging.getLogger(__name__)

MEMORY_CSV = "streamprune_memory.csv"


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
    admm_iterations: int = 8
    admm_rho: float = 0.3
    batch: int = 8
    layer_errors: bool | None = None  # None: where the method holds X^T X anyway (SparseGPT)
    offload_activations: str = "auto"
    max_gpu_memory: int | None = None  # bytes
    overwrite: bool = False
    restart: bool = False
    profile_memory: bool = False
    moe_calibration: str = "routed"  # an expert's statistics: the tokens routed to it, or "all" tokens
    moe_min_tokens: int = 128  # an expert routed fewer calibration tokens takes every token's statistics
    wbits: int | None = None  # quantize the kept weights to this many bits (None: no quantization)
    group_size: int = 128  # columns per quantization group; -1: one group per output row
    sym: bool = True  # symmetric grid (zero point 2**(wbits-1)), else asymmetric
    format: str = "dense"  # how the pruned linears are written: one of formats.FORMATS (compressed-tensors: quantized)
    eval: str | Path | None = None  # the pruned model's perplexity on this file, computed in the same pass
    eval_nsamples: int | None = None  # at most this many evaluation windows
    eval_seqlen: int | None = None  # their length (default: the model's, as for `streamprune eval`)
    eval_dense: bool = False  # also the dense model's perplexity, from the same reads
    allocation: str = "uniform"  # each block's sparsity: "uniform", or "owl" (from its outlier ratio; see owl.py)
    owl_lambda: float = OWL_LAMBDA  # owl: the block sparsities spread over 2 lambda, their weighted mean the target
    owl_m: float = OWL_M  # owl: an outlier's score exceeds M times its block's mean score


MOE_CALIBRATION = ("routed", "all")
MOE_OPTIONS = ("moe_calibration", "moe_min_tokens")  # part of the fingerprint of a model with experts
QUANT_OPTIONS = ("wbits", "group_size", "sym")  # part of the fingerprint when --wbits is given
OWL_OPTIONS = ("allocation", "owl_lambda", "owl_m")  # part of the fingerprint of a run with --allocation owl
# Options that change what is written (the report included); a resumed run must agree on all of them and on
# the method's own knobs.
RESULT_OPTIONS = ("method", "sparsity", "pattern", "nsamples", "seqlen", "seed", "device", "sequential",
                  "batch", "layer_errors")  # batch: as fitted to the GPU budget


@dataclass
class Job:
    """A validated run: everything checked before the first byte is written."""

    ckpt: Checkpoint
    opts: PruneOptions
    out_dir: Path
    pattern: Pattern
    sparsity: float
    errors: bool  # each pruned linear's reconstruction error is computed (X^T X is kept)
    knobs: dict[str, Any]  # the method's own options
    seqlen: int
    device: torch.device
    windows: Tensor | None
    placement: str
    batch: int  # windows per forward call
    offload_hessian: bool  # X^T X waits in host memory while its solver matrix is on the GPU
    grid: Grid | None  # the quantization grid of the kept weights, if any
    args: dict[str, Any]
    fingerprint: dict[str, Any]
    journal: Journal | None  # a verified journal of the same job to resume, else None
    layout: Layout  # how the output stores the pruned linears (the output format over their names)
    eval_windows: Tensor | None = None  # --eval: the evaluation token windows (K, T) (this rank's share)
    owl_windows: Tensor | None = None  # --allocation owl: the calibration windows its dense pass reads
    ranks: Ranks = field(default_factory=Ranks)  # the processes of the run (one by default)

    @property
    def work(self) -> Path:
        """This rank's folder for temporary files (activations on disk) inside OUT_DIR."""
        work = self.out_dir / WORK_DIR
        return work / f"rank{self.ranks.rank}" if self.ranks.distributed else work

    def clock(self) -> float:
        """Seconds, after waiting for queued device work, so phase timings hold on CUDA too."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def check_out_dir(model_dir: Path, out_dir: Path) -> None:
    """Refuse an output inside the input, or an unwritable one."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src or dst.is_relative_to(src):
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is inside MODEL_DIR {str(model_dir)!r}; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} exists and is not a directory")
    parent = dst if dst.exists() else next(p for p in dst.parents if p.exists())
    probe = parent / f".streamprune-write-probe-{os.getpid()}"  # one per process: ranks probe at once
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is not writable ({e.strerror or e})") from e


def check_disk_space(ckpt: Checkpoint, out_dir: Path, journal: Journal | None, activation_bytes: int) -> None:
    dst = out_dir.resolve()
    existing = dst if dst.exists() else next(p for p in dst.parents if p.exists())
    output = sum(info.nbytes for info in ckpt.tensors.values())
    if journal:
        output -= sum(e["bytes"] for e in journal.done.values())
    needed = output + activation_bytes
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ArgumentError(
            f"not enough disk space in {str(existing)!r}: the run needs {needed / 2**30:.2f} GiB "
            f"({output / 2**30:.2f} GiB of output, {activation_bytes / 2**30:.2f} GiB of temporary activations) "
            f"but {free / 2**30:.2f} GiB are free"
        )


OWN_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.tmp)?")
OWN_FILES = {name + suffix for name in (INDEX_NAME, REPORT_NAME, MEMORY_CSV) for suffix in ("", ".tmp")}


def clear_previous_output(out_dir: Path, every_checkpoint_file: bool) -> None:
    """Remove what a previous run of streamprune wrote (its shards, index, report, memory profile and work
    folder), so nothing stale survives; with `every_checkpoint_file` (--overwrite) also every other
    *.safetensors file. Nothing else in OUT_DIR is touched."""
    for path in out_dir.iterdir():
        ours = OWN_SHARD.fullmatch(path.name) or path.name in OWN_FILES
        if path.is_file() and (ours or (every_checkpoint_file and path.suffix == ".safetensors")):
            path.unlink()
    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)


def previous_job(out_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """The fingerprint of the job that wrote OUT_DIR, and whether that job finished."""
    journal = Journal.load(out_dir)
    if journal is not None:
        return journal.fingerprint, False
    report = out_dir / REPORT_NAME
    if report.is_file() and (out_dir / INDEX_NAME).is_file():
        try:
            return json.loads(report.read_text())["fingerprint"], True
        except (ValueError, KeyError, TypeError):
            return None, False
    return None, False


def prepare(model_dir: Path, out_dir: Path, opts: PruneOptions, ranks: Ranks | None = None) -> Job | Report:
    """Validate the whole job; returns the saved report instead when OUT_DIR already holds it, finished. With
    several `ranks`, every rank validates the same job and keeps its share of the calibration (and --eval) windows;
    the fingerprint is that of the whole job, the same as with one process."""
    ranks = ranks or Ranks()
    cls = method(opts.method)
    pattern = Pattern.parse(opts.pattern)
    sparsity = resolve_sparsity(opts.sparsity, pattern)
    knobs = {k: getattr(opts, k) for k in cls.knobs}
    cls.check(knobs, pattern)
    errors = default_errors(cls, opts.layer_errors)
    if opts.batch < 1:
        raise ArgumentError(f"batch {opts.batch!r} must be at least 1")
    if opts.moe_calibration not in MOE_CALIBRATION:
        raise ArgumentError(f"moe-calibration {opts.moe_calibration!r} is not one of {', '.join(MOE_CALIBRATION)}")
    if opts.moe_min_tokens < 1:
        raise ArgumentError(f"moe-min-tokens {opts.moe_min_tokens!r} must be at least 1")
    owl = check_allocation(opts, pattern)
    grid = None if opts.wbits is None else Grid(opts.wbits, opts.group_size, opts.sym)
    if grid is not None and pattern.structured and grid.group_size != -1 and grid.group_size % pattern.m:
        raise ArgumentError(f"group size {grid.group_size} is not a multiple of M={pattern.m} of pattern {pattern}")
    fmt = make_format(opts.format, grid)  # an unknown format, or a quantized one without --wbits, is refused here
    ckpt = Checkpoint(model_dir)
    if grid is not None:  # scales as the model's dtype stores them, whatever the output format
        grid = dataclasses.replace(grid, scale_dtype=ckpt.dtype)
        fmt = make_format(opts.format, grid)
    if ckpt.layout.encoded:
        raise ArgumentError(f"{str(model_dir)!r} is stored {ckpt.layout.format.name} (packed integer weights); "
                            "prune its unquantized original")
    cfg = ckpt.config
    layout = Layout(fmt, frozenset(output_linears(ckpt)))
    for name in layout.encoded:  # e.g. a group size that does not divide a linear's width, refused up front
        fmt.tensors(name, ckpt.tensors[name].torch_dtype, ckpt.tensors[name].shape)
    for (param, bid), name in ckpt.names.items():
        if param[0] in PRUNABLE and param[1] == "weight" and bid == 0:
            check_columns(ckpt.tensors[name].shape[1], pattern, name)
    if grid is not None:  # every pruned matrix, experts included, before anything is written
        widths = {name: ckpt.tensors[name].shape[1] for (param, _), name in ckpt.names.items()
                  if param[0] in PRUNABLE and param[1] == "weight"}
        widths.update({name: ckpt.tensors[name].shape[1] for names in ckpt.experts.values()
                       for param, name in names.items() if param[1] == "weight"})
        check_group_size(grid, widths)
    device = resolve_device(opts.device)  # as recorded; each rank computes on its own (`ranks.device`)
    seqlen = cfg.default_seqlen if opts.seqlen is None else opts.seqlen
    windows = None
    calib = None if opts.calib is None else Path(opts.calib)
    if calib is not None and not cls.accumulates(errors) and not owl:
        logger.warning("method %r reads no calibration statistics: %s is not used (it is with --layer-errors)",
                       opts.method, calib)
        calib = None
    if calib is not None:
        cfg.check_seqlen(seqlen)
        windows = calib_windows(calib, model_dir, cfg.vocab_size, seqlen, opts.nsamples, opts.seed)
    elif cls.needs_data or errors or owl:
        what = f"method {opts.method!r}" if cls.needs_data else "--layer-errors" if errors else "--allocation owl"
        raise DataError(f"{what} needs calibration data: pass --calib FILE")
    if owl and cfg.n_experts:
        raise ArgumentError(f"--allocation owl does not support Mixture-of-Experts models (model_type "
                            f"{cfg.model_type!r}); use --allocation uniform")
    owl_windows = windows if owl else None
    if not cls.accumulates(errors):  # magnitude: the windows serve only the allocation's dense pass
        windows = None
    check_out_dir(model_dir, out_dir)

    ewindows = run_eval_windows(ckpt, opts.eval, opts.eval_nsamples, opts.eval_seqlen, opts.eval_dense)
    shares = ranks.shares(opts.nsamples, windows, ewindows, bool(cfg.n_experts) and not opts.sequential)
    fp = footprint(ckpt, shares.nsamples, seqlen, opts.method, opts.sequential, errors, knobs, grid,
                   *eval_sizes(shares.eval_windows, opts.eval_dense), owl=owl)
    decision = decide(fp, ranks.device(device), opts.offload_activations, opts.max_gpu_memory, opts.batch,
                      opts.nsamples, ranks.local_world)
    placement, batch = decision.placement, decision.batch
    if batch != min(opts.batch, opts.nsamples):
        logger.info("forward batch %d -> %d windows to fit the GPU budget", opts.batch, batch)
    if decision.offload_hessian:
        logger.info("X^T X waits in host memory while its solver matrix is on the GPU, to fit the GPU budget")
    args = {**asdict(opts), "sparsity": sparsity, "pattern": str(pattern), "seqlen": seqlen,
            "calib": None if calib is None else str(calib), "device": str(device),
            "offload_activations": placement, "batch": batch, "offload_hessian": decision.offload_hessian,
            "layer_errors": errors, "eval": None if opts.eval is None else str(opts.eval),
            "eval_seqlen": None if ewindows is None else ewindows.shape[1]}
    moe_options = MOE_OPTIONS if cfg.n_experts else ()
    quant_options = QUANT_OPTIONS if grid is not None else ()  # so that runs without --wbits still resume
    format_options = ("format",) if opts.format != "dense" else ()  # a dense run's fingerprint is that of before
    owl_options = OWL_OPTIONS if owl else ()  # so is a uniform run's
    # --eval changes the report: its windows and streams are part of the job (absent without it, as before)
    eval_options = {} if ewindows is None else {"eval": calib_digest(Path(opts.eval), ewindows),
                                                 "eval_dense": opts.eval_dense}
    drawn = windows if windows is not None else owl_windows
    fprint = fingerprint(ckpt, None if drawn is None else calib_digest(calib, drawn),
                         {k: args[k] for k in RESULT_OPTIONS + cls.knobs + moe_options + quant_options
                          + format_options + owl_options} | eval_options)
    journal = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old, finished = previous_job(out_dir)
        if old is None and not opts.overwrite:  # --restart starts over a run of streamprune, nothing else
            raise ArgumentError(
                f"OUT_DIR {str(out_dir)!r} is not empty and holds no run of streamprune; pass --overwrite to replace "
                "its checkpoint files")
        if old is not None and not (opts.overwrite or opts.restart):  # the same job resumes, another is refused
            if old != fprint:
                raise ArgumentError(
                    f"OUT_DIR {str(out_dir)!r} holds a different run ({describe_difference(old, fprint)}); pass "
                    "--restart to start over")
            if finished:
                logger.warning("%s already holds the finished result of this run", out_dir)
                return load_report(out_dir)
            journal = Journal.load(out_dir)
            assert journal is not None  # previous_job found it
            journal = journal.verified(out_dir)

    check_disk_space(ckpt, out_dir, journal, ranks.local_world * fp.activations if placement == "disk" else 0)
    return Job(ckpt, opts, out_dir, pattern, sparsity, errors, knobs, seqlen, ranks.device(device), shares.windows,
               placement, batch, decision.offload_hessian, grid, args, fprint, journal, layout, shares.eval_windows,
               None if owl_windows is None else owl_windows[ranks.share(owl_windows.shape[0])], ranks)


def check_allocation(opts: PruneOptions, pattern: Pattern) -> bool:
    """Refuse a bad --allocation or OWL parameter; whether the blocks get OWL's sparsities."""
    if opts.allocation not in ALLOCATIONS:
        raise ArgumentError(f"allocation {opts.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    if opts.allocation == "uniform":
        return False
    if pattern.structured:
        raise ArgumentError(f"--allocation owl needs unstructured sparsity: an N:M pattern ({str(pattern)!r}) keeps "
                            "uniform allocation")
    if not (math.isfinite(opts.owl_lambda) and opts.owl_lambda >= 0):
        raise ArgumentError(f"owl-lambda {opts.owl_lambda!r} must be a finite number >= 0")
    if not (math.isfinite(opts.owl_m) and opts.owl_m > 0):
        raise ArgumentError(f"owl-m {opts.owl_m!r} must be a finite number > 0")
    return True


def output_linears(ckpt: Checkpoint) -> list[str]:
    """The weights a run prunes, so writes through its output format: every linear of SEQUENTIAL and
    EXPERT_SEQUENTIAL."""
    names = [name for ((role, kind), bid), name in ckpt.names.items()
             if bid is not None and kind == "weight" and role in PRUNABLE]
    return names + [name for names in ckpt.experts.values() for (role, _), name in names.items() if role in PRUNABLE]


def block_meta(ckpt: Checkpoint, bid: int | None, layout: Layout) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The stored tensors of block `bid`'s output shard (None: the globals'), with dtypes and shapes: the input's
    tensors, the linears in `layout.encoded` as its format stores them. Known before any is solved."""
    meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for n in ckpt.stored_names(bid):
        meta.update(layout.meta(n, ckpt.tensors[n].torch_dtype, ckpt.tensors[n].shape))
    return meta


def finish_config(ckpt: Checkpoint, out_dir: Path, layout: Layout) -> None:
    """config.json of the output (copied from the input): with the format's quantization config, whose `ignore`
    lists every linear module the output does not encode (the head among them); unchanged for the dense format."""
    ignore = [m for m in ckpt.linear_modules() if m + ".weight" not in layout.encoded]
    write_quantization_config(out_dir, layout.format, ignore)


def load_report(out_dir: Path) -> Report:
    raw = json.loads((out_dir / REPORT_NAME).read_text())
    raw["layers"] = [LayerReport(**lr) for lr in raw["layers"]]
    return Report(**raw)


Put = Callable[[str, Tensor], None]  # writes one pruned tensor, by checkpoint name, into the block's shard


class BlockPruner:
    """Prunes the linears of one block, site by site in the order of SEQUENTIAL, then its routed experts one at a
    time in the order of EXPERT_SEQUENTIAL; each pruned tensor is written as soon as it is final.

    With several ranks, each runs the forwards on its share of the windows, the statistics are summed across ranks
    before a site is solved (`merge`), each linear is solved by one rank and its stored tensors broadcast from
    there (`prune_roles`); with one process these steps do nothing."""

    def __init__(self, job: Job, report: Report, allocation: Allocation | None = None) -> None:
        self.job, self.report = job, report
        self.ckpt, self.opts, self.device, self.ranks = job.ckpt, job.opts, job.device, job.ranks
        self.turn = 0  # rotates the ranks that solve single-linear sites
        n = self.ckpt.config.n_layers
        self.block_sparsity = [job.sparsity] * n if allocation is None else allocation.block_sparsity
        # each linear's exact count of removed weights when the blocks have their own sparsities (none when uniform:
        # the method's own rounding of the one sparsity, as always)
        self.zeros: dict[str, int] = {} if allocation is None else linear_zeros(
            [(name, math.prod(self.ckpt.tensors[name].shape), allocation.block_sparsity[b])
             for b in range(n) for _, name in block_linears(self.ckpt, b).values()])

    def merge(self, bid: int, *pruners: Pruner) -> None:
        """Sum the statistics each rank added from its share of the windows (no-op with one process)."""
        if self.ranks.distributed:
            t = self.job.clock()
            for pruner in pruners:
                pruner.all_reduce(self.ranks)
            self.report.add("sync", self.job.clock() - t, bid)

    def new_pruner(self, w: dict[Param, Tensor], roles: list[Role] | tuple[Role, ...], bid: int) -> Pruner:
        columns = w[(roles[0], "weight")].shape[1]
        return make_pruner(self.opts.method, columns, self.device, self.block_sparsity[bid], self.job.pattern,
                           self.job.offload_hessian, self.job.errors, grid=self.job.grid, **self.job.knobs)

    def run(self, bid: int, w: dict[Param, Tensor], x: Activations | None, pos: Positions | None, put: Put,
            m_store: Activations | None = None) -> Routes | None:
        """Prune every linear of block `bid` outside its routed experts, in place in `w`, writing each with `put`.
        Without --sequential, an MoE block's calibration forward also keeps the dense MoE input in `m_store` and
        returns its routes, for the experts' statistics."""
        names = self.ckpt.pruned_linears(bid)
        groups = [(site, [r for r in roles if r in names]) for site, roles in SEQUENTIAL]
        groups = [(site, roles) for site, roles in groups if roles]
        if x is None:  # magnitude without calibration data: no statistics needed
            for _, roles in groups:
                self.prune_roles(bid, w, self.new_pruner(w, roles, bid), roles, names, put)
            return None
        assert pos is not None
        stages = [groups] if not self.opts.sequential else [[g] for g in groups]
        routes = None
        for stage in stages:  # sequential: one stage per site, each seeing the pruned sites before it
            pruners = {site: self.new_pruner(w, roles, bid) for site, roles in stage}
            routes = self.calibrate(bid, w, x, pos, pruners, dict(stage), names, m_store)
            for site, roles in stage:
                self.prune_roles(bid, w, pruners[site], roles, names, put)
        return routes

    def calibrate(self, bid: int, w: dict[Param, Tensor], x: Activations, pos: Positions,
                  pruners: dict[Site, Pruner], roles: dict[Site, list[Role]], names: dict[Role, str],
                  m_store: Activations | None = None) -> Routes | None:
        """One forward over the calibration windows, feeding each watched site's input to its pruner (and, with
        `m_store`, running an MoE block's first pass to the end: its MoE input kept there, its routes returned)."""
        clock = self.job.clock
        start, hessian = clock(), 0.0

        def tap(site: Site, a: Tensor) -> None:
            nonlocal hessian
            if site in pruners:
                t = clock()
                pruners[site].add_batch(a)
                hessian += clock() - t

        last = [site for site, _ in SEQUENTIAL if site in pruners][-1]  # nothing past it is needed
        routes = forward_block(self.ckpt, w, x, pos, None, self.job.batch, self.device, tap=tap,
                               until=None if m_store else last, m_store=m_store)
        self.report.add("hessian", hessian, bid)
        self.report.add("calibrate", clock() - start - hessian, bid)
        self.merge(bid, *pruners.values())
        for site, pruner in pruners.items():
            self.check_inputs(bid, pruner, [names[r] for r in roles[site]])
        return routes

    def check_inputs(self, bid: int, pruner: Pruner, names: list[str]) -> None:
        # a NaN or Inf in any input column shows on its diagonal entry (|x_i x_j| <= (x_i^2 + x_j^2) / 2),
        # so the d entries are checked instead of the d^2 (whose check would allocate d^2 temporaries)
        sqnorms = pruner.column_sqnorms()
        if sqnorms is not None and not bool(torch.isfinite(sqnorms).all()):
            raise DataError(f"block {bid}: calibration activations entering {', '.join(names)} contain NaN or Inf")

    def prune_roles(self, bid: int, w: dict[Param, Tensor], pruner: Pruner, roles: list[Role] | tuple[Role, ...],
                    names: dict[Role, str], put: Put, **row: Any) -> None:
        """Prune the linears that share `pruner`'s input, then score each: the errors come after the
        solver's state is released, so at most one d x d matrix beside X^T X is ever needed. `row`: extra
        fields of their report rows (an expert's index and tokens). Each linear is solved and scored by its owner
        rank (`Ranks.owners`), then its stored tensors go from there to every rank (`share`)."""
        clock = self.job.clock
        owners = self.ranks.owners([w[(role, "weight")].numel() for role in roles], self.turn)
        self.turn += 1
        done, solved_parts = [], {}
        for role in [r for r, owner in zip(roles, owners) if owner == self.ranks.rank]:
            start = clock()
            name = names[role]
            dense = w[(role, "weight")]
            result = pruner.prune(dense, self.zeros.get(name))
            # contiguous, so that later sites and blocks multiply the same layout as a resumed run's replay
            pruned = torch.empty(result.weight.shape, dtype=self.ckpt.tensors[name].torch_dtype, device=self.device)
            pruned.copy_(result.weight)
            if not all_finite(pruned):  # checked as stored: a float16 cast can overflow what float32 held
                raise StreamPruneError(
                    f"block {bid}: the pruned {name} does not fit {pruned.dtype} (largest |w| "
                    f"{float(result.weight.abs().max()):.4g}, damping {result.info.get('damp', self.opts.damp):g}); "
                    "nothing of this block was written: rerun with a larger --damp and --restart, or prune a bfloat16 or "
                    "float32 copy")
            info, unrounded, quant, result = result.info, result.unrounded, result.quant, None
            # written through the output format; later sites and blocks see what it decodes (what a loader computes)
            solved_parts[role] = stored = self.job.layout.format.encode(name, pruned, quant)
            pruned = w[(role, "weight")] = self.job.layout.weight(name, stored)
            solved = clock() - start
            self.report.add("solve", solved, bid)
            done.append((role, name, dense, pruned, unrounded, info, solved))
        pruner.release_solver()
        grid = self.job.grid
        rows = {}
        for role, name, dense, pruned, unrounded, info, solved in done:
            start = clock()
            err = pruner.reconstruction_error(dense, pruned)
            split = None if unrounded is None else pruner.split_errors(dense, unrounded, pruned)
            seconds = clock() - start
            self.report.add("error", seconds, bid)
            rows[role] = LayerReport(
                block=bid, role=role.value, name=name, shape=list(pruned.shape),
                sparsity=float((pruned == 0).sum()) / pruned.numel(), rel_error=err, seconds=solved + seconds,
                damp=info.get("damp"), damp_retries=int(info.get("damp_retries", 0)),
                iterations=None if "iterations" not in info else int(info["iterations"]),
                cg_iterations=None if "cg_iterations" not in info else int(info["cg_iterations"]),
                cg_residual=info.get("residual"),
                sparsity_error=None if split is None else split[0], quant_error=None if split is None else split[1],
                packed_bytes=None if grid is None else grid.packed_bytes(*pruned.shape), **row)
        pruner.free()
        self.share(bid, w, roles, owners, names, solved_parts, put)
        if self.ranks.distributed:
            rows = {role: r for part in self.ranks.all_gather(rows) for role, r in part.items()}
        self.report.layers += [rows[role] for role in roles]

    def share(self, bid: int, w: dict[Param, Tensor], roles: list[Role] | tuple[Role, ...], owners: list[int],
              names: dict[Role, str], solved: dict[Role, dict[str, Tensor]], put: Put) -> None:
        """Each pruned linear's stored tensors from the rank that solved it (`solved` holds this rank's) to every
        rank, which uses them from now on; `put` writes them (a no-op outside rank 0)."""
        t = self.job.clock()
        for role, owner in zip(roles, owners):
            name = names[role]
            stored = solved.get(role)
            if stored is None:  # another rank's: received into buffers of the stored dtypes and shapes
                info = self.ckpt.tensors[name]
                stored = {part: torch.empty(shape, dtype=dtype, device=self.device)
                          for part, (dtype, shape) in self.job.layout.meta(name, info.torch_dtype, info.shape).items()}
            for part in stored.values():
                self.ranks.broadcast(part, owner)
            for part, tensor in stored.items():
                put(part, tensor.cpu())
            if role not in solved:
                w[(role, "weight")] = self.job.layout.weight(name, stored)
        if self.ranks.distributed:
            self.report.add("sync", self.job.clock() - t, bid)

    def run_experts(self, block: Block, x: Activations | None, out: Activations | None, pos: Positions | None,
                    shard: ShardFile, dense_routes: Routes | None, before: Callable[[Part], None] = lambda e: None,
                    after: Callable[[Part], None] = lambda e: None) -> None:
        """Prune block's routed experts one at a time (the next one read ahead), each writing its tensors as soon
        as they are final; with calibration data, `out` receives the pruned block's output.

        Sequential: a first pass of the pruned block writes its output without the routed experts into `out` and
        its MoE input over `x`; each expert's statistics come from the rows of the tokens routed to it (or from
        every token, see `expert_rows`), its down projection's from its pruned gate and up projections, and its
        weighted output is added to `out` before the next expert is read. Without --sequential, the statistics
        come from the dense block (its MoE input kept in `out` by `run`, with `dense_routes`), and the pruned block
        runs forward once every expert is written, reading them back from the shard.

        `before` sees each expert as read (dense), `after` as pruned (the evaluation streams of --eval)."""
        steps = self.expert_steps(block.bid, block.w, x, out, pos, shard, dense_routes, before, after)
        next(steps)
        for expert in block.experts():
            steps.send(expert)
        with contextlib.suppress(StopIteration):
            steps.send(None)

    def expert_steps(self, bid: int, w: dict[Param, Tensor], x: Activations | None, out: Activations | None,
                     pos: Positions | None, shard: ShardFile, dense_routes: Routes | None,
                     before: Callable[[Part], None], after: Callable[[Part], None]) -> Generator[None, Part | None, None]:
        """`run_experts` as a coroutine: primed with `next` (the first pass), then sent each routed expert as read,
        then None, after which it finishes the block (without --sequential, the pruned block's forward). A sweep
        sends each expert it reads to every point's steps; an expert's `w` is pruned in place."""
        if x is None:  # magnitude without calibration data
            while (expert := (yield)) is not None:
                before(expert)
                names = {param[0]: name for param, name in self.ckpt.experts[(bid, expert.xid)].items()}
                for _, roles in EXPERT_SEQUENTIAL:
                    self.prune_roles(bid, expert.w, self.new_pruner(expert.w, roles, bid), roles, names, shard.put,
                                     expert=expert.xid)
                after(expert)
            return
        assert out is not None and pos is not None
        sequential = self.opts.sequential
        clock, batch = self.job.clock, self.job.batch
        if sequential:
            t = clock()
            routes = forward_block(self.ckpt, w, x, pos, out, batch, self.device)
            self.report.add("forward", clock() - t, bid)
            stats = x
        else:
            assert dense_routes is not None
            stats, routes = out, dense_routes
        while (expert := (yield)) is not None:
            xid, we = expert.xid, expert.w
            expert.raw.clear()  # held by `we` (on the CPU the same tensors); on a GPU, its host copy goes now
            self.report.add("read", expert.wait_seconds, bid)
            self.report.read_total_seconds += expert.read_seconds
            names = {param[0]: name for param, name in self.ckpt.experts[(bid, xid)].items()}
            rows = routed_rows(routes, xid)
            rows_in, how, n_routed = self.expert_rows(rows, stats)
            row = {"expert": xid, "routed_tokens": n_routed, "statistics": how}
            before(expert)
            p_in, p_down = (self.new_pruner(we, roles, bid) for _, roles in EXPERT_SEQUENTIAL)
            t, hessian = clock(), 0.0
            for i, j, token, _ in rows_in:
                m = stats.rows(i, j, token, self.device)
                h0 = clock()
                p_in.add_batch(m)
                if not sequential:  # the dense expert's hidden activations
                    p_down.add_batch(expert_hidden(self.cfg, we, m))
                hessian += clock() - h0
            self.report.add("hessian", hessian, bid)
            self.report.add("calibrate", clock() - t - hessian, bid)
            self.merge(bid, p_in) if sequential else self.merge(bid, p_in, p_down)
            (_, in_roles), (_, down_roles) = EXPERT_SEQUENTIAL
            self.check_inputs(bid, p_in, [names[r] for r in in_roles])
            self.prune_roles(bid, we, p_in, in_roles, names, shard.put, **row)
            if sequential:
                t = clock()
                for i, j, token, _ in rows_in:
                    p_down.add_batch(expert_hidden(self.cfg, we, stats.rows(i, j, token, self.device)))
                self.report.add("hessian", clock() - t, bid)
                self.merge(bid, p_down)
            self.check_inputs(bid, p_down, [names[r] for r in down_roles])
            self.prune_roles(bid, we, p_down, down_roles, names, shard.put, **row)
            if sequential:
                t = clock()
                add_expert(self.ckpt, we, rows, x, out, self.device)
                self.report.add("forward", clock() - t, bid)
            after(expert)
            del expert, we
        if not sequential:  # the pruned block forward, its experts read back from the shard being written
            t = clock()
            written = BlockStream(self.ckpt, self.device, range(bid, bid + 1), shard_of=lambda _: shard.path,
                                  layout=self.job.layout)
            forward_block(self.ckpt, w, x, pos, out, batch, self.device, experts=lambda: written.experts(bid))
            self.report.add("forward", clock() - t, bid)

    def expert_rows(self, rows: Routes, stats: Activations) -> tuple[Routes, str, int]:
        """The token rows whose statistics an expert's solve reads: those routed to it (--moe-calibration routed)
        unless they are fewer than --moe-min-tokens, else every token that enters the MoE layer; with what was
        used and the number routed."""
        n_routed = self.ranks.sum_int(sum(int(token.numel()) for _, _, token, _ in rows))  # on every rank's share
        if self.opts.moe_calibration == "routed" and n_routed >= self.opts.moe_min_tokens:
            return rows, "routed", n_routed
        how = "all" if self.opts.moe_calibration == "all" else f"all (fewer than {self.opts.moe_min_tokens} routed)"
        T = stats.shape[1]
        every = [(i, j, torch.arange((j - i) * T), torch.ones(0)) for i, j, _, _ in rows]
        return every, how, n_routed

    @property
    def cfg(self) -> ModelConfig:
        return self.ckpt.config


class NoShard:
    """A shard that keeps nothing: what a rank other than rank 0 writes a block into, and a sweep's point whose
    checkpoint is not asked for."""

    path = None

    def put(self, name: str, tensor: Tensor) -> None:
        pass


class Run:
    """One execution of a prepared job, resuming from its journal when there is one."""

    def __init__(self, job: Job, progress: bool) -> None:
        self.job, self.progress = job, progress
        self.ckpt, self.cfg, self.ranks = job.ckpt, job.ckpt.config, job.ranks
        self.writer = ShardWriter(job.out_dir, self.cfg.n_layers + 1)
        env = environment(job.device)
        if self.ranks.distributed:  # like the thread count: the order of the sums, not the result, depends on it
            env["world_size"] = self.ranks.world
        self.journal = job.journal or Journal(job.fingerprint, environment=env)
        self.report = Report(args=job.args, model={
            "dir": str(job.ckpt.dir), "model_type": self.cfg.model_type, "n_layers": self.cfg.n_layers,
            "dtype": str(job.ckpt.dtype).removeprefix("torch.")}, fingerprint=job.fingerprint, environment=env)
        before = self.journal.environment
        self.report.environment_changes = [f"{k}: {before.get(k)!r} before, {v!r} now" for k, v in env.items()
                                           if before.get(k) != v]
        if self.report.environment_changes:
            logger.warning("resuming in another environment (%s): the result is valid but its last bits may differ "
                           "from an uninterrupted run's", "; ".join(self.report.environment_changes))

    def commit(self, idx: int, tensors: Raw | dict[str, Any], layers: list[LayerReport]) -> None:
        """Write one shard (tensors, or lazy entries for `write_safetensors`), then record it in the journal."""
        start = time.perf_counter()
        entries = eager(tensors) if all(isinstance(t, Tensor) for t in tensors.values()) else tensors
        path = self.writer.write(idx, entries)
        self.record(idx, path, layers)
        self.report.add("write", time.perf_counter() - start, None if idx == 0 else idx - 1)

    def record(self, idx: int, path: Path, layers: list[LayerReport]) -> None:
        """Record shard `idx`, written, flushed, renamed into place and checked, in the journal (rank 0's)."""
        if not self.ranks.is_writer:
            return
        self.journal.done[idx] = {"shard": path.name, "bytes": path.stat().st_size, "tensors": sorted(read_header(path)),
                                  "layers": [asdict(lr) for lr in layers]}
        self.journal.save(self.job.out_dir)

    def first_unfinished(self) -> int:
        bid = 0
        while bid + 1 in self.journal.done:
            bid += 1
        return bid

    def execute(self) -> Report:
        job, cfg, report, ranks = self.job, self.cfg, self.report, self.ranks
        start = time.perf_counter()
        out = job.out_dir
        writer = ranks.is_writer  # rank 0 alone writes the output, the journal and the report
        if writer:
            if job.journal is None:
                out.mkdir(parents=True, exist_ok=True)
                clear_previous_output(out, every_checkpoint_file=job.opts.overwrite)
            self.journal.save(out)
        ranks.barrier()  # OUT_DIR cleared before any rank puts its temporary files there
        if 0 not in self.journal.done and writer:
            lazy = {n: (info.torch_dtype, info.shape, (lambda info=info: read_tensor(info)))
                    for n in self.ckpt.stored_names(None) for info in [self.ckpt.tensors[n]]}
            self.commit(0, lazy, [])  # copied bit for bit, one tensor in memory at a time
        first = self.first_unfinished()
        for idx in [i for i in self.journal.done if i > first]:  # redo everything after the first gap
            del self.journal.done[idx]
        for idx in sorted(self.journal.done):  # the finished blocks' report rows
            report.layers += [LayerReport(**lr) for lr in self.journal.done[idx]["layers"]]
        report.resumed_at_block = first if job.journal else None

        with PeakMemory(job.device, record=job.opts.profile_memory) as mem, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
            TimeElapsedColumn(), disable=not self.progress, transient=True,
        ) as bar:
            task = bar.add_task("calibration inputs", total=cfg.n_layers, completed=first)

            def phase(text: str) -> None:
                mem.phase = text
                bar.update(task, description=text)

            x = scratch = pos = None
            if job.windows is not None:
                shape = (job.windows.shape[0], job.seqlen, cfg.hidden_size)
                x, scratch = (make_store(shape, job.placement, job.device, job.work, f"act{i}") for i in (0, 1))
                pos = positions(cfg, job.seqlen).to(job.device, torch.float32)
            allocation = self.allocate(x, pos, phase)  # --allocation owl: each block's sparsity (x is free till now)
            report.block_sparsity = [job.sparsity] * cfg.n_layers if allocation is None else allocation.block_sparsity
            report.allocation = None if allocation is None else allocation.to_dict()
            phase("embed")
            if job.windows is not None:
                assert x is not None
                embed_windows(self.ckpt, job.windows, job.device, x, job.batch)
            streams = self.eval_streams(first, phase)  # --eval: "pruned", and with --eval-dense "dense"
            pruned_eval, dense_eval = streams.get("pruned"), streams.get("dense")
            x, scratch = self.replay(first, x, scratch, pos, pruned_eval, phase)

            def timed(step: Callable[..., None] | None) -> Callable[..., None]:
                """An evaluation stream's step, its time counted as the block's "eval" phase (no stream: nothing)."""
                def run(*a: Any) -> None:
                    if step is not None:
                        t = job.clock()
                        step(*a)
                        report.add("eval", job.clock() - t, bid)
                return run

            block_pruner = BlockPruner(job, report, allocation)
            phase(f"block {first}: read")
            for block in BlockStream(self.ckpt, job.device, range(first, cfg.n_layers)):
                bid, raw, w = block.bid, block.raw, block.w
                report.add("read", block.wait_seconds, bid)  # the part of reading not hidden by the read-ahead
                report.read_total_seconds += block.read_seconds
                # the block's shard has the input's tensors, names, dtypes and shapes: its header is written first, and
                # each tensor as soon as it is final (the pruned ones as they are solved, the others now)
                meta = block_meta(self.ckpt, bid, job.layout)
                pruned = set(self.ckpt.pruned_linears(bid).values())
                n_before = len(report.layers)
                with self.writer.open(bid + 1, meta) if writer else contextlib.nullcontext(NoShard()) as shard:
                    t = time.perf_counter()
                    for name, tensor in raw.items():
                        if name not in pruned:
                            shard.put(name, tensor)
                    raw.clear()  # written or held by `w` (on the CPU the same tensors; on a GPU, their copies)
                    report.add("write", time.perf_counter() - t, bid)
                    phase(f"block {bid}: prune")
                    block_pos = None if pos is None else pos.of(bid)
                    moe = self.ckpt.n_experts(bid) > 0
                    m_store = scratch if moe and not job.opts.sequential else None
                    # the evaluation streams enter the block through its weights as read (dense) and once pruned
                    # (outside its routed experts, which join each stream one at a time, before and after pruning)
                    timed(dense_eval and dense_eval.enter)(bid, w)
                    routes = block_pruner.run(bid, w, x, block_pos, shard.put, m_store=m_store)
                    timed(pruned_eval and pruned_eval.enter)(bid, w)
                    if moe:
                        phase(f"block {bid}: experts")
                        block_pruner.run_experts(block, x, scratch, block_pos, shard, routes,
                                                 before=timed(dense_eval and dense_eval.expert),
                                                 after=timed(pruned_eval and pruned_eval.expert))
                    elif x is not None:
                        assert scratch is not None and block_pos is not None
                        phase(f"block {bid}: forward")
                        t = job.clock()
                        forward_block(self.ckpt, w, x, block_pos, scratch, job.batch, job.device)
                        report.add("forward", job.clock() - t, bid)
                    phase(f"block {bid}: write")
                    t = time.perf_counter()
                if x is not None:
                    x, scratch = scratch, x  # this block's outputs are the next block's inputs
                for stream in streams.values():
                    stream.leave()
                self.record(bid + 1, self.job.out_dir / self.writer.shard_name(bid + 1), report.layers[n_before:])
                report.add("write", time.perf_counter() - t, bid)
                del block, raw, w  # before the next block arrives: two blocks as stored at most
                release_freed_memory()
                bar.advance(task)
                phase(f"block {bid + 1}: read")
            for store in (x, scratch):
                if store is not None:
                    store.close()
            if streams:
                phase("eval: head")
                t = job.clock()
                self.perplexities(streams)
                report.add("eval", job.clock() - t)
            phase("finish")
            if writer:
                copy_side_files(self.ckpt.dir, out)
                finish_config(self.ckpt, out, job.layout)
                self.writer.finish()  # the index last: until now OUT_DIR does not load as a checkpoint

        report.read_hidden_seconds = max(0.0, report.read_total_seconds - report.phases["read"])
        pruned = sum(lr.shape[0] * lr.shape[1] for lr in report.layers)
        zeros = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in report.layers)
        report.total_sparsity = zeros / pruned if pruned else 0.0
        if job.grid is not None:
            report.quantization = quantization_summary(job.grid, self.ckpt, report.layers)
        report.wall_seconds = time.perf_counter() - start
        report.peak_rss_bytes = mem.peak_rss
        report.process_peak_rss_bytes = os_peak_rss()
        report.peak_gpu_bytes = mem.peak_gpu
        report.peak_rss_phase = mem.peak_phase
        if ranks.distributed:  # each rank's figures, in rank order, for rank 0's report
            report.world_size = ranks.world
            report.ranks = ranks.all_gather({
                "rank": ranks.rank, "device": str(job.device), "windows": 0 if job.windows is None else len(job.windows),
                "wall_seconds": time.perf_counter() - start, "phases": report.phases,
                "peak_rss_bytes": mem.peak_rss, "peak_gpu_bytes": mem.peak_gpu})
        if not writer:
            return report
        if job.opts.profile_memory:
            mem.write_csv(out / MEMORY_CSV)
            report.memory_profile = {"csv": MEMORY_CSV, "samples": len(mem.samples), "interval_seconds": mem.interval,
                                     "peak_rss_bytes": mem.peak_rss, "peak_rss_phase": mem.peak_phase,
                                     "peak_gpu_bytes": mem.peak_gpu}
        report.save(out)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        return report

    def allocate(self, x: Activations | None, pos: LayerPositions | None,
                 phase: Callable[[str], None]) -> Allocation | None:
        """--allocation owl: the block sparsities, from the journal when a previous run of this job computed them, else
        from a forward of the dense model over the calibration windows (in `x`, or for magnitude, whose run has no
        activations, in a buffer of its own), saved in the journal before block 0 is pruned."""
        job, cfg = self.job, self.cfg
        if job.owl_windows is None:
            return None
        if self.journal.allocation is not None:
            return Allocation(**self.journal.allocation)
        start = job.clock()
        store = x
        if store is None:
            shape = (job.owl_windows.shape[0], job.seqlen, cfg.hidden_size)
            store = make_store(shape, job.placement, job.device, job.out_dir / WORK_DIR, "owl")
            pos = positions(cfg, job.seqlen).to(job.device, torch.float32)
        assert pos is not None
        phase("owl: embed")
        embed_windows(self.ckpt, job.owl_windows, job.device, store, job.batch)
        ratios = dense_outlier_ratios(self.ckpt, store, pos, job.batch, job.device, job.opts.owl_m,
                                      progress=lambda bid: phase(f"owl: block {bid}"),
                                      reduce=self.ranks.all_reduce_sum)  # every rank's share of the windows
        if store is not x:
            store.close()
        weights = pruned_counts(self.ckpt)
        allocation = Allocation("owl", job.opts.owl_lambda, job.opts.owl_m, ratios, weights,
                                allocate(ratios, weights, job.sparsity, job.opts.owl_lambda))
        self.journal.allocation = allocation.to_dict()
        if self.ranks.is_writer:
            self.journal.save(job.out_dir)
        self.report.add("owl", job.clock() - start)
        return allocation

    def eval_streams(self, first: int, phase: Callable[[str], None]) -> dict[str, HiddenStream]:
        """--eval: the evaluation windows, embedded, in a stream of the pruned model ("pruned") and with --eval-dense
        one of the dense model ("dense"), their buffers placed like the calibration activations; a resumed run
        brings them to block `first` by replaying the written blocks (pruned) and the input's (dense)."""
        job = self.job
        if job.eval_windows is None:
            return {}
        K, T = job.eval_windows.shape
        shape, work = (K, T, self.cfg.hidden_size), job.work
        names = ["pruned"] + (["dense"] if job.opts.eval_dense else [])
        streams = {}
        for name in names:
            phase(f"eval: embed ({name})")
            stores = [make_store(shape, job.placement, job.device, work, f"eval-{name}{i}")
                      for i in range(2 if self.cfg.n_experts else 1)]
            streams[name] = HiddenStream(self.ckpt, job.eval_windows, job.device, job.batch, *stores)
        if first and "dense" in streams:  # the pruned stream is replayed with the calibration inputs (`replay`)
            start = time.perf_counter()
            for block in BlockStream(self.ckpt, job.device, range(first)):
                phase(f"block {block.bid}: replay eval (dense)")
                streams["dense"].block(block)
                del block
            self.report.add("replay", time.perf_counter() - start)
        return streams

    def perplexities(self, streams: dict[str, HiddenStream]) -> None:
        """The report's perplexities: each stream through the final norm and the head."""
        ppl = {}
        for name, stream in streams.items():
            total, count = stream.nll()  # this rank's windows: summed over the ranks
            total, count = self.ranks.sum_float(total), self.ranks.sum_int(count)
            ppl[name] = math.exp(total / count)
            stream.close()
        windows = self.job.eval_windows
        assert windows is not None
        self.report.perplexity, self.report.dense_perplexity = ppl["pruned"], ppl.get("dense")
        self.report.eval = {"file": str(self.job.opts.eval), "windows": self.ranks.sum_int(windows.shape[0]),
                            "seqlen": windows.shape[1], "tokens": count}

    def replay(self, first: int, x: Activations | None, scratch: Activations | None, pos: LayerPositions | None,
               stream: HiddenStream | None, phase: Callable[[str], None]) -> tuple[Activations | None, Activations | None]:
        """A resumed run's calibration inputs (x, scratch) and --eval stream of the pruned model, brought to block
        `first` by one read of the blocks already written (each routed expert read once for both)."""
        if not first or (x is None and stream is None):
            return x, scratch
        start = time.perf_counter()
        job = self.job
        shards = BlockStream(self.ckpt, job.device, range(first),
                             shard_of=lambda bid: job.out_dir / self.journal.done[bid + 1]["shard"], layout=job.layout)
        for block in shards:
            bid = block.bid
            phase(f"block {bid}: replay")
            routes = None
            if x is not None:  # an MoE block's first pass here, its experts below (see forward_block)
                assert scratch is not None and pos is not None
                routes = forward_block(self.ckpt, block.w, x, pos.of(bid), scratch, job.batch, job.device)
            if stream is not None:
                stream.enter(bid, block.w)
            if self.ckpt.n_experts(bid):
                for expert in block.experts():
                    if routes is not None:
                        add_expert(self.ckpt, expert.w, routed_rows(routes, expert.xid), x, scratch, job.device)
                    if stream is not None:
                        stream.expert(expert)
            if x is not None:
                x, scratch = scratch, x
            if stream is not None:
                stream.leave()
            del block
        self.report.add("replay", time.perf_counter() - start)
        return x, scratch


def prune(model_dir: str | Path, out_dir: str | Path, progress: bool = False, ranks: Ranks | None = None,
          **options: Any) -> Report:
    """Prune a checkpoint block by block and write the result as an ordinary checkpoint.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors shards, tokenizer.json); only read.
        out_dir: where the pruned checkpoint goes; must not be inside `model_dir`.
        progress: show a progress bar per block.
        ranks: the processes of the run (default: those torchrun describes in the environment, else this one);
            see `streamprune.dist`. Rank 0 writes OUT_DIR and returns the run's report; other ranks return their
            own figures.
        **options: fields of `PruneOptions`:
            method: "sparsegpt", "admm", "wanda" or "magnitude".
            sparsity: fraction of weights to remove per matrix, in [0, 1) (default 0.5; implied by N:M).
            pattern: "unstructured" or "N:M" (e.g. "2:4", "4:8").
            calib: calibration data (.txt, .jsonl with "text", or .npy token ids); optional for magnitude.
            nsamples, seqlen, seed: calibration windows (count, length, random seed).
            device: "auto", "cpu" or "cuda".
            sequential: compute later sub-layers' statistics from already pruned earlier ones.
            blocksize, damp: SparseGPT's column block size and relative Hessian damping (damp: ADMM's too).
            admm_iterations, admm_rho: ADMM's iterations and penalty (relative to the scaled Hessian's unit
                diagonal).
            batch: calibration windows per forward call.
            layer_errors: compute each pruned linear's reconstruction error for the report (None: where the
                method holds X^T X anyway, i.e. SparseGPT; Wanda and magnitude would keep it for this alone).
            offload_activations: "auto", "device", "cpu" or "disk".
            max_gpu_memory: bytes of GPU memory the run may plan for.
            overwrite: replace the checkpoint files of a non-empty OUT_DIR that holds no run of this job.
            restart: start over even if OUT_DIR holds an unfinished run with other arguments.
            profile_memory: sample RSS and GPU memory during the run into OUT_DIR/streamprune_memory.csv.
            format: how the pruned linears are written, "dense" (the input's dtype) or "compressed-tensors"
                (pack-quantized; needs a quantized run).
            allocation: each block's sparsity, "uniform" or "owl" (outlier-weighted; see streamprune/owl.py),
                with owl_lambda (the spread is 2 lambda) and owl_m (an outlier's score over its block's mean).

    Returns:
        The run report, also saved as OUT_DIR/streamprune_report.json.
    """
    unknown = set(options) - set(PruneOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    ranks = Ranks.from_env() if ranks is None else ranks
    job = prepare(Path(model_dir), Path(out_dir), PruneOptions(**options), ranks)
    if isinstance(job, Report):
        return job
    ranks.barrier()  # every rank has read OUT_DIR (its journal) before rank 0 writes there
    return Run(job, progress and ranks.is_writer).execute()

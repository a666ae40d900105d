"""A job checked whole before the first byte is written: the options against the model, the calibration and
evaluation windows drawn, the memory placed, and what OUT_DIR already holds (the same job to resume or return,
another one refused).

A run and a sweep are prepared by the same steps; a sweep's points are each a run's `Job` of their own (method,
pattern, sparsity) that share the sweep's windows and placement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

from streamprune.arch import PRUNABLE
from streamprune.calib import CalibSource, calib_sources, source_windows
from streamprune.checkpoint import INDEX_NAME, Checkpoint
from streamprune.dist import Ranks
from streamprune.errors import ArgumentError, DataError
from streamprune.experts import Removal, kept_experts, load_scores
from streamprune.formats import CompressedTensorsFormat, DenseFormat, Layout, make_format
from streamprune.journal import (JOURNAL_NAME, WORK_DIR, Journal, calib_digest, describe_difference, fingerprint,
                                 sources_digest)
from streamprune.memory import MEMORY_CSV, resolve_device
from streamprune.options import RUN, SWEEP, PruneOptions, Scope, check, fingerprint_args, finite_at_least
from streamprune.plan import MemoryPlan, decide, eval_sizes, eval_tasks, footprint, plan_sweep, run_eval_windows
from streamprune.pruners import Pattern, default_errors, method, resolve_sparsity
from streamprune.pruners.masks import check_columns
from streamprune.pruners.quant import Grid, check_group_size
from streamprune.report import REPORT_NAME, Report, load_report
from streamprune.sweep import SWEEP_FILES, SWEEP_JOURNAL, SWEEP_NAME, Point, SweepResult, as_fractions, sweep_points
from streamprune.writer import output_linears

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """A validated run (or one point of a sweep): everything checked before the first byte is written."""

    ckpt: Checkpoint
    out: Checkpoint  # the structure of what the job writes (the input's, unless routed experts are removed)
    opts: PruneOptions
    out_dir: Path
    pattern: Pattern
    sparsity: float
    errors: bool  # each pruned linear's reconstruction error is computed (X^T X is kept)
    knobs: dict[str, Any]  # the method's own options
    seqlen: int
    device: torch.device
    windows: Tensor | None  # the calibration windows whose statistics the method reads (this rank's share)
    placement: str
    batch: int  # windows per forward call
    offload_hessian: bool  # X^T X waits in host memory while its solver matrix is on the GPU
    grid: Grid | None  # the quantization grid of the kept weights, if any
    layout: Layout  # how the output stores the pruned linears (the output format over their names)
    solves: bool = True  # False: routed experts are removed and nothing else changes (every kept tensor copied)
    removal: Removal | None = None  # --prune-experts: how many experts each MoE block keeps, and by which scores
    # the linears `grid` quantizes (None: every pruned one); a packed input written as stored quantizes only those it
    # stores packed (Kimi-K2-Thinking's routed experts), on its own grid
    quantized: frozenset[str] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    journal: Journal | None = None  # a verified journal of the same job to resume, else None
    eval_windows: Tensor | None = None  # --eval: the evaluation token windows (K, T) (this rank's share)
    owl_windows: Tensor | None = None  # --allocation owl: the calibration windows its dense pass reads
    tasks: Any = None  # --eval-tasks: the lm-eval tasks (`tasks.TaskRun`), their requests recorded
    task_sequences: dict[tuple[int, ...], set[tuple[int, ...]]] = field(default_factory=dict)  # what they score
    ranks: Ranks = field(default_factory=Ranks)  # the processes of the run (one by default)

    def grid_of(self, name: str) -> Grid | None:
        """The quantization grid of linear `name` (None: not quantized)."""
        return self.grid if self.quantized is None or name in self.quantized else None

    @property
    def work(self) -> Path:
        """This rank's folder for temporary files (activations on disk) inside OUT_DIR."""
        work = self.out_dir / WORK_DIR
        return work / f"rank{self.ranks.rank}" if self.ranks.distributed else work


@dataclass
class SweepJob:
    """A validated sweep: its points' jobs, the windows they share, the memory plan, and the state to resume from."""

    ckpt: Checkpoint
    out_dir: Path
    save_dir: Path | None
    points: list[Point]
    jobs: list[Job]
    windows: Tensor
    eval_windows: Tensor
    device: torch.device
    plan: MemoryPlan
    args: dict[str, Any]
    fingerprint: dict[str, Any]
    state: dict[str, Any] | None  # the journal of the sweep resumed, if any

    @property
    def first(self) -> int:
        """The first unfinished block (0 unless resuming)."""
        return 0 if self.state is None else self.state["blocks_done"]


def prepare(model_dir: Path, out_dir: Path, opts: PruneOptions, ranks: Ranks | None = None) -> Job | Report:
    """Validate the whole run; returns the saved report instead when OUT_DIR already holds it, finished. With
    several `ranks`, every rank validates the same job and keeps its share of the calibration (and --eval) windows;
    the fingerprint is that of the whole job, the same as with one process."""
    ranks = ranks or Ranks()
    check(opts, RUN)
    opts = with_sources(opts)
    cls, pattern = method(opts.method), Pattern.parse(opts.pattern)
    sparsity = resolve_sparsity(opts.sparsity, pattern)
    knobs = {k: getattr(opts, k) for k in cls.knobs}
    cls.check(knobs, pattern)
    errors = default_errors(cls, opts.layer_errors)
    owl = check_allocation(opts, pattern)
    ckpt = open_model(model_dir)
    removal = expert_removal(ckpt, opts)
    kept = None if removal is None else removal.kept
    solves = kept is None or sparsity > 0 or pattern.structured or opts.wbits is not None
    errors = errors and solves
    surveys = removal is not None and removal.surveys  # the experts' scores (or the dense block) read the calibration
    if removal is not None and removal.compensate and solves and not opts.sequential:
        raise ArgumentError("--compensate-experts fits the kept experts to the block as pruned so far: it needs "
                            "--sequential")
    grid, layout, quantized = output_layout(ckpt, opts, pattern)
    device = resolve_device(opts.device)  # as recorded; each rank computes on its own (`ranks.device`)
    seqlen = ckpt.config.default_seqlen if opts.seqlen is None else opts.seqlen
    reads = solves and cls.accumulates(errors)  # the method reads calibration statistics
    calib = used_sources(opts, cls, solves, errors, reads or owl or surveys, removal)
    if owl and ckpt.config.n_experts:
        raise ArgumentError(f"--allocation owl does not support Mixture-of-Experts models (model_type "
                            f"{ckpt.config.model_type!r}); use --allocation uniform")
    drawn = None if calib is None else draw_windows(ckpt, calib, opts.seed, seqlen)
    windows = drawn if reads or surveys else None  # magnitude: the windows serve only OWL's dense pass
    check_out_dir(model_dir, out_dir)
    ewindows = run_eval_windows(ckpt, opts.eval, opts.eval_nsamples, opts.eval_seqlen,
                                opts.eval_dense and not opts.eval_tasks)  # --eval-dense: of the tasks, or of both
    tasks, sequences = eval_tasks(ckpt, opts, ranks.world)
    # without weight solves the block is exact as read, so no expert is read back: the run is sequential whatever
    # --sequential says (see PruneLane), and ranks may share it
    shares = ranks.shares(opts.nsamples, windows, ewindows,
                          bool(ckpt.config.n_experts) and not (opts.sequential or not solves))
    fp = footprint(ckpt, shares.nsamples, seqlen, opts.method, opts.sequential, errors, knobs, grid,
                   *eval_sizes(shares.eval_windows, opts.eval_dense, sequences), owl=owl,
                   compensate=removal is not None and removal.compensate)
    decision = decide(fp, ranks.device(device), opts.offload_activations, opts.max_gpu_memory, opts.batch,
                      opts.nsamples, ranks.local_world)
    if decision.batch != min(opts.batch, opts.nsamples):
        logger.info("forward batch %d -> %d windows to fit the GPU budget", opts.batch, decision.batch)
    if decision.offload_hessian:
        logger.info("X^T X waits in host memory while its solver matrix is on the GPU, to fit the GPU budget")
    args = {**opts.args(RUN), "sparsity": sparsity, "pattern": str(pattern), "seqlen": seqlen,
            "calib": None if calib is None else [s.to_dict() for s in calib], "device": str(device),
            "offload_activations": decision.placement, "batch": decision.batch,
            "offload_hessian": decision.offload_hessian, "layer_errors": errors,
            "eval_seqlen": None if ewindows is None else ewindows.shape[1]}
    digests = {} if ewindows is None else {"eval": calib_digest(Path(opts.eval), ewindows)}  # type: ignore[arg-type]
    if removal is not None and removal.source is not None:
        digests["expert_scores"] = removal.source["sha256"]
    scope = Scope(frozenset(cls.knobs), bool(ckpt.config.n_experts), grid is not None, owl, kept is not None, digests)
    fprint = fingerprint(ckpt, None if drawn is None else sources_digest(calib, drawn),
                         fingerprint_args(args, RUN, scope))
    state, finished = previous_job(out_dir, fprint, opts, RUN)
    if finished:
        return load_report(out_dir)
    journal = None if state is None else Journal.from_dict(state).verified(out_dir)
    out = ckpt if kept is None else ckpt.keeping_experts(kept)  # what is written: the kept experts only
    layout = dataclasses.replace(layout, fused=out.layout.fused)  # experts stored fused stay fused
    output = sum(info.nbytes for info in out.tensors.values()) - sum(e["bytes"] for e in (journal.done if journal else {}).values())
    activations = ranks.local_world * fp.activations if decision.placement == "disk" else 0
    check_disk(out_dir, "the run", {"output": output, "temporary activations": activations})
    return Job(ckpt=ckpt, out=out, opts=opts, out_dir=out_dir,
               pattern=pattern, sparsity=sparsity, errors=errors, knobs=knobs, seqlen=seqlen,
               device=ranks.device(device), windows=shares.windows, placement=decision.placement, batch=decision.batch,
               offload_hessian=decision.offload_hessian, grid=grid, layout=layout, solves=solves, removal=removal,
               args=args, quantized=quantized,
               fingerprint=fprint, journal=journal, eval_windows=shares.eval_windows,
               owl_windows=None if not owl or drawn is None else drawn[ranks.share(drawn.shape[0])], ranks=ranks,
               tasks=tasks, task_sequences=sequences)



def prepare_sweep(model_dir: Path, out_dir: Path, opts: PruneOptions) -> SweepJob | SweepResult:
    """Validate the whole sweep; returns the saved result instead when OUT_DIR already holds it, finished."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ArgumentError("sweep runs in one process: launch it without torchrun")
    check(opts, SWEEP)
    opts = with_sources(opts)
    points = sweep_points(list(opts.methods), None if opts.sparsities is None else list(opts.sparsities),
                          list(opts.patterns), as_fractions(opts.prune_experts), list(opts.expert_criteria),
                          opts.compensate_experts)
    if opts.calib is None:
        raise DataError("sweep needs calibration data: pass --calib FILE")
    if opts.eval is None:
        raise DataError("sweep needs evaluation data: pass --eval FILE")
    ckpt = open_model(model_dir)
    for p in points:
        cls, pattern = method(p.method), Pattern.parse(p.pattern)
        cls.check({k: getattr(opts, k) for k in cls.knobs}, pattern)
        if p.experts is not None:
            kept_experts(ckpt.config, p.experts, opts.experts_multiple)  # refused as run refuses it
            if p.compensate and p.solves and not opts.sequential:
                raise ArgumentError("--compensate-experts fits the kept experts to the block as pruned so far: it "
                                    "needs --sequential")
    device = resolve_device(opts.device)
    seqlen = ckpt.config.default_seqlen if opts.seqlen is None else opts.seqlen
    calib: tuple[CalibSource, ...] = opts.calib  # type: ignore[assignment]
    windows = draw_windows(ckpt, calib, opts.seed, seqlen)
    ewindows = run_eval_windows(ckpt, opts.eval, opts.eval_nsamples, opts.eval_seqlen, False)
    assert ewindows is not None
    save_dir = None if opts.save_dir is None else Path(opts.save_dir)
    for folder in [out_dir] + ([save_dir] if save_dir is not None else []):
        check_out_dir(model_dir, folder)
    plan = plan_sweep(ckpt, [(p.method, p.compensate) for p in points], opts, seqlen, ewindows, device)
    check_sweep_memory(plan, opts, device)
    acts = sum(b for what, b, _ in plan.consumers if "activations" in what or "hidden states" in what)
    check_disk(out_dir, "the sweep", {"two saved states of the points' streams": 2 * acts,
                                      "temporary activations": acts if plan.placement == "disk" else 0})
    args = {**opts.args(SWEEP), "calib": [s.to_dict() for s in calib], "seqlen": seqlen, "device": str(device), "eval": str(opts.eval),
            "eval_seqlen": ewindows.shape[1], "offload_activations": plan.placement, "batch": plan.batch,
            "points": [dataclasses.asdict(p) for p in points]}
    knobs = frozenset(k for p in points for k in method(p.method).knobs)
    scope = Scope(knobs, bool(ckpt.config.n_experts), digests={"eval": calib_digest(Path(opts.eval), ewindows)})
    fprint = fingerprint(ckpt, sources_digest(calib, windows),
                         fingerprint_args(args, SWEEP, scope) | {"points": args["points"]})
    state, finished = previous_job(out_dir, fprint, opts, SWEEP)
    if finished:
        return SweepResult(**json.loads((out_dir / SWEEP_NAME).read_text()))
    jobs = [point_job(ckpt, opts, p, out_dir if save_dir is None else save_dir / p.label, seqlen, device, windows,
                      ewindows, plan) for p in points]
    return SweepJob(ckpt=ckpt, out_dir=out_dir, save_dir=save_dir, points=points, jobs=jobs, windows=windows,
                    eval_windows=ewindows, device=device, plan=plan, args=args, fingerprint=fprint, state=state)


def point_job(ckpt: Checkpoint, opts: PruneOptions, p: Point, out_dir: Path, seqlen: int, device: torch.device,
              windows: Tensor, ewindows: Tensor, plan: MemoryPlan) -> Job:
    """One point of a sweep, as `prepare` would give it for `run` with the point's method, pattern and sparsity."""
    cls = method(p.method)
    removal = None if p.experts is None else Removal(kept_experts(ckpt.config, p.experts, opts.experts_multiple),
                                                     p.criterion or "reap", compensate=p.compensate)
    solves = removal is None or p.solves
    errors = default_errors(cls, opts.layer_errors) and solves
    popts = dataclasses.replace(opts, method=p.method, pattern=p.pattern, sparsity=p.sparsity, prune_experts=p.experts,
                                expert_criterion=p.criterion or opts.expert_criterion, compensate_experts=p.compensate)
    out = ckpt if removal is None else ckpt.keeping_experts(removal.kept)
    reads = (solves and cls.accumulates(errors)) or (removal is not None and removal.surveys)
    return Job(ckpt=ckpt, out=out, opts=popts, out_dir=out_dir, pattern=Pattern.parse(p.pattern), sparsity=p.sparsity,
               errors=errors, knobs={k: getattr(opts, k) for k in cls.knobs}, seqlen=seqlen, device=device,
               windows=windows if reads else None, placement=plan.placement, batch=plan.batch,
               offload_hessian=plan.offload_hessian, grid=None, solves=solves, removal=removal,
               layout=Layout(make_format("dense", None), frozenset(output_linears(ckpt)), out.layout.fused),
               args={**popts.args(RUN), "calib": [s.to_dict() for s in opts.calib], "eval": str(opts.eval), "seqlen": seqlen,
                     "device": str(device)}, eval_windows=ewindows)


def open_model(model_dir: Path) -> Checkpoint:
    """The checkpoint to prune (dense, fp8, or packed: see `output_layout` for how each is written)."""
    ckpt = Checkpoint(model_dir)
    return ckpt


def used_sources(opts: PruneOptions, cls: Any, solves: bool, errors: bool, read: bool,
                 removal: Removal | None) -> tuple[CalibSource, ...] | None:
    """The calibration sources the run reads (`read`: something reads them), None when none is; a source given that
    nothing reads is named in a warning, one that is needed and not given refused."""
    calib: tuple[CalibSource, ...] | None = opts.calib or None  # type: ignore[assignment]
    if calib is not None and not read:
        files = ", ".join(str(s.path) for s in calib)
        if solves:
            logger.warning("method %r reads no calibration statistics: %s is not used (it is with --layer-errors)",
                           opts.method, files)
        else:
            logger.warning("expert removal by %s with --sparsity 0 reads no calibration data: %s is not used",
                           "random scores" if removal and removal.scores is None else "the scores of a report", files)
        return None
    if calib is None and ((solves and (cls.needs_data or errors)) or read):
        what = (f"method {opts.method!r}" if solves and cls.needs_data else "--layer-errors" if solves and errors
                else "--allocation owl" if opts.allocation == "owl" else "--compensate-experts"
                if opts.compensate_experts else f"--expert-criterion {opts.expert_criterion!r}")
        raise DataError(f"{what} needs calibration data: pass --calib FILE")
    return calib


def expert_removal(ckpt: Checkpoint, opts: PruneOptions) -> Removal | None:
    """--prune-experts: the experts each MoE block keeps, and the scores that choose them (a report's with
    --expert-scores, else the criterion's); None without it."""
    if opts.prune_experts is None:
        if opts.expert_scores is not None:
            raise ArgumentError(f"--expert-scores {str(opts.expert_scores)!r} needs --prune-experts F (the fraction of "
                                "each block's experts to remove)")
        if opts.compensate_experts:
            raise ArgumentError("--compensate-experts needs --prune-experts F (it fits the experts a removal keeps)")
        return None
    if isinstance(opts.prune_experts, (tuple, list)):
        raise ArgumentError(f"--prune-experts {','.join(map(str, opts.prune_experts))!r}: run removes one fraction "
                            "(sweep takes several)")
    kept = kept_experts(ckpt.config, opts.prune_experts, opts.experts_multiple)
    if opts.expert_scores is None:
        return Removal(kept, opts.expert_criterion, compensate=opts.compensate_experts)
    scores, source = load_scores(Path(opts.expert_scores), ckpt)
    return Removal(kept, source["criterion"], scores, source, opts.compensate_experts)


def with_sources(opts: PruneOptions) -> PruneOptions:
    """`opts` with --calib as its sources (each FILE[:N] with its count) and --nsamples as their total count."""
    sources = calib_sources(opts.calib, opts.nsamples)
    if not sources:
        return dataclasses.replace(opts, calib=None)
    return dataclasses.replace(opts, calib=sources, nsamples=sum(s.windows for s in sources))


def draw_windows(ckpt: Checkpoint, sources: tuple[CalibSource, ...], seed: int, seqlen: int) -> Tensor:
    ckpt.config.check_seqlen(seqlen)
    return source_windows(sources, ckpt.dir, ckpt.config.vocab_size, seqlen, seed)


def check_allocation(opts: PruneOptions, pattern: Pattern) -> bool:
    """Refuse a bad OWL parameter; whether the blocks get OWL's sparsities."""
    if opts.allocation == "uniform":
        return False
    if pattern.structured:
        raise ArgumentError(f"--allocation owl needs unstructured sparsity: an N:M pattern ({str(pattern)!r}) keeps "
                            "uniform allocation")
    finite_at_least("owl-lambda", opts.owl_lambda, 0)
    finite_at_least("owl-m", opts.owl_m, 0, strict=True)
    return True


def output_layout(ckpt: Checkpoint, opts: PruneOptions,
                  pattern: Pattern) -> tuple[Grid | None, Layout, frozenset[str] | None]:
    """The quantization grid (--wbits), the output layout of the pruned linears and the linears the grid applies to
    (None: all), every one of them checked against the pattern, the grid and the format before anything is written.
    A checkpoint stored packed (compressed-tensors) is written as stored by default: the linears it packs pruned and
    quantized again on its own grid, the others pruned."""
    grid = None if opts.wbits is None else Grid(opts.wbits, opts.group_size, opts.sym)
    if ckpt.layout.encoded and isinstance(ckpt.layout.format, CompressedTensorsFormat) and opts.format is None \
            and grid is None:
        fmt = ckpt.layout.format
        grid = Grid(fmt.bits, fmt.group_size, fmt.sym, scale_dtype=ckpt.dtype)
        layout = Layout(fmt, frozenset(ckpt.layout.encoded & set(output_linears(ckpt))))
        return grid, layout, layout.encoded
    if grid is not None and pattern.structured and grid.group_size != -1 and grid.group_size % pattern.m:
        raise ArgumentError(f"group size {grid.group_size} is not a multiple of M={pattern.m} of pattern {pattern}")
    given = ckpt.layout.format if ckpt.layout.encoded else DenseFormat()  # the input's
    name = opts.format or given.name  # by default, as the input stores them
    make_format(name, grid)  # an unknown format, or a quantized one without --wbits, is refused here
    if grid is not None:  # scales as the model's dtype stores them, whatever the output format
        grid = dataclasses.replace(grid, scale_dtype=ckpt.dtype)
    # fp8 as read keeps the input's tiles and scales' dtype; packed integers take the run's own grid (--wbits)
    fmt = given if name == given.name == "fp8" else make_format(name, grid).bound(ckpt.dtype, {})
    if ckpt.layout.fused and fmt.name not in ("dense", "mxfp4"):
        fused = next(iter(ckpt.layout.fused.values())).tensor
        raise ArgumentError(f"--format {fmt.name}: the routed experts are stored fused ({fused}, ...), which dense "
                            "and mxfp4 write back; use --format dense (--wbits rounds their weights to the grid in "
                            "the model's dtype) or mxfp4")
    if fmt.name == "mxfp4" and not ckpt.config.n_experts:
        raise ArgumentError(f"--format mxfp4 stores routed experts; model_type {ckpt.config.model_type!r} has none")
    # MXFP4 encodes the routed experts only, as gpt-oss is published; the other formats every pruned linear
    layout = Layout(fmt, frozenset(n for n in output_linears(ckpt) if fmt.name != "mxfp4" or n in ckpt.expert_of))
    unpruned = sorted(ckpt.layout.encoded - layout.encoded)
    if unpruned:
        raise ArgumentError(f"{unpruned[0]} is stored {given.name} but is not a linear streamprune prunes "
                            f"({len(unpruned)} such); it would be written as read, in another format than the output's")
    for name in layout.encoded:  # e.g. a group size that does not divide a linear's width, refused up front
        fmt.tensors(name, ckpt.info(name).torch_dtype, ckpt.info(name).shape)
    for (param, bid), name in ckpt.names.items():
        if param[0] in PRUNABLE and param[1] == "weight" and bid == 0:
            check_columns(ckpt.info(name).shape[1], pattern, name)
    if grid is not None:  # every pruned matrix, experts included
        check_group_size(grid, {name: ckpt.info(name).shape[1] for name in output_linears(ckpt)})
    return grid, layout, None


def check_out_dir(model_dir: Path, out_dir: Path) -> None:
    """Refuse an output inside the input, or an unwritable one."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src or dst.is_relative_to(src):
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is inside MODEL_DIR {str(model_dir)!r}; choose another folder")
    if dst.exists() and not dst.is_dir():
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} exists and is not a directory")
    probe = existing_parent(dst) / f".streamprune-write-probe-{os.getpid()}"  # one per process: ranks probe at once
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is not writable ({e.strerror or e})") from e


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    return path if path.exists() else next(p for p in path.parents if p.exists())


def check_disk(out_dir: Path, what: str, parts: dict[str, int]) -> None:
    """Refuse a job whose files (`parts`: bytes by what they are) do not fit the free space where OUT_DIR is."""
    where = existing_parent(out_dir)
    needed, free = sum(parts.values()), shutil.disk_usage(where).free
    if free < needed:
        detail = ", ".join(f"{b / 2**30:.2f} GiB of {name}" for name, b in parts.items())
        raise ArgumentError(f"not enough disk space in {str(where)!r}: {what} needs {needed / 2**30:.2f} GiB ({detail}) "
                            f"but {free / 2**30:.2f} GiB are free")


def check_sweep_memory(plan: MemoryPlan, opts: PruneOptions, device: torch.device) -> None:
    """Refuse, with the figures, points whose activations do not fit the placement asked for (a run's placement
    follows its budget; a sweep holds every point's activations at once)."""
    acts = sum(b for what, b, _ in plan.consumers if "activations" in what or "hidden states" in what)
    if plan.placement == "cpu":
        free = psutil.virtual_memory().available
        if plan.host_peak > free:
            raise ArgumentError(f"sweep: the points need {plan.host_peak / 2**30:.2f} GiB of host memory "
                                f"({acts / 2**30:.2f} GiB of activations) but {free / 2**30:.2f} GiB are available; "
                                "use fewer points, fewer windows or --offload-activations disk")
    elif plan.placement == "device" and opts.max_gpu_memory is not None and device.type == "cuda":
        if plan.device_peak > opts.max_gpu_memory:
            raise ArgumentError(f"sweep: the points need {plan.device_peak / 2**30:.2f} GiB of GPU memory "
                                f"({acts / 2**30:.2f} GiB of activations) but --max-gpu-memory is "
                                f"{opts.max_gpu_memory / 2**30:.2f} GiB; use fewer points or --offload-activations cpu")


# What OUT_DIR holds: the journal of an unfinished job in its work folder, or a finished job's result file.
@dataclass(frozen=True)
class Files:
    what: str  # "run" or "sweep"
    journal: str  # the journal's name in the work folder
    result: tuple[str, ...]  # the files a finished job leaves, the first holding its fingerprint
    own: Callable[[str], bool]  # a file name this job writes in OUT_DIR (cleared when it starts over)
    replaced: str  # what --overwrite replaces in a folder that holds no such job


OWN_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors(\.tmp)?")
RUN_OWN = {name + suffix for name in (INDEX_NAME, REPORT_NAME, MEMORY_CSV) for suffix in ("", ".tmp")}
FILES = {
    RUN: Files("run", JOURNAL_NAME, (REPORT_NAME, INDEX_NAME), lambda n: bool(OWN_SHARD.fullmatch(n)) or n in RUN_OWN,
               "checkpoint files"),
    SWEEP: Files("sweep", SWEEP_JOURNAL, (SWEEP_NAME,), lambda n: n.removesuffix(".tmp") in SWEEP_FILES, "sweep files"),
}


def previous_job(out_dir: Path, fprint: dict[str, Any], opts: PruneOptions, command: str) -> tuple[dict | None, bool]:
    """The journal of the same job in OUT_DIR to resume (None: start afresh) and whether that job finished; another
    job, or files that are no job's, are refused unless --restart or --overwrite says otherwise."""
    files = FILES[command]
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        return None, False
    state, finished = read_previous(out_dir, files)
    if state is None and not opts.overwrite:  # --restart starts over a job of streamprune, nothing else
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is not empty and holds no {files.what} of streamprune; pass "
                            f"--overwrite to replace its {files.replaced}")
    if state is None or opts.overwrite or opts.restart:
        return None, False
    if state["fingerprint"] != fprint:
        raise ArgumentError(f"OUT_DIR {str(out_dir)!r} holds a different {files.what} "
                            f"({describe_difference(state['fingerprint'], fprint)}); pass --restart to start over")
    if finished:
        logger.warning("%s already holds the finished result of this %s", out_dir, files.what)
    return state, finished


def read_previous(out_dir: Path, files: Files) -> tuple[dict[str, Any] | None, bool]:
    """The journal of the job that wrote OUT_DIR (or, for a finished one, its fingerprint), and whether it
    finished; None when there is no readable one."""
    journal = out_dir / WORK_DIR / files.journal
    if journal.is_file():
        try:
            state = json.loads(journal.read_text(encoding="utf-8"))
            if isinstance(state, dict) and "fingerprint" in state:
                return state, False
        except ValueError:
            pass  # unreadable: as if there were none
    if all((out_dir / name).is_file() for name in files.result):
        try:
            return {"fingerprint": json.loads((out_dir / files.result[0]).read_text())["fingerprint"]}, True
        except (ValueError, KeyError, TypeError):
            return None, False
    return None, False


def clear_previous_output(out_dir: Path, command: str, every_checkpoint_file: bool = False) -> None:
    """Remove what a previous job of streamprune wrote in OUT_DIR (the files of a `command` job, and the work
    folder), so nothing stale survives; with `every_checkpoint_file` (--overwrite) also every other *.safetensors
    file. Nothing else in OUT_DIR is touched."""
    own = FILES[command].own
    for path in out_dir.iterdir():
        if path.is_file() and (own(path.name) or (every_checkpoint_file and path.suffix == ".safetensors")):
            path.unlink()
    shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)

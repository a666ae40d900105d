"""Many pruning points in one read of the checkpoint: a perplexity curve without a checkpoint per point.

Each point (method, pattern, sparsity) keeps its own calibration activations and evaluation hidden states: its
model diverges from the others after the first block. Each block is read once; every point prunes its own copy of
it (one point at a time, so the workspaces are one point's) and carries its streams through the pruned block. The
dense model's evaluation stream goes through the block as read. After each block every stream is saved in
OUT_DIR/.streamprune (alternately in two folders, so the last complete state survives a kill) and the journal
records the block: a rerun of the same command resumes at the first unfinished block.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamprune.activations import Activations, copy_store, load_store, make_store, save_store
from streamprune.arch.block import Positions, positions
from streamprune.calib import calib_windows
from streamprune.checkpoint import Checkpoint
from streamprune.errors import ArgumentError, DataError
from streamprune.evaluate import HiddenStream
from streamprune.forward import embed_windows, forward_block
from streamprune.fileio import atomic_write
from streamprune.journal import WORK_DIR, calib_digest, describe_difference, fingerprint
from streamprune.memory import PeakMemory, os_peak_rss, release_freed_memory, resolve_device
from streamprune.pipeline import (
    RESULT_OPTIONS,
    BlockPruner,
    Job,
    NoShard,
    PruneOptions,
    block_meta,
    check_out_dir,
    finish_config,
    output_linears,
)
from streamprune.plan import MemoryPlan, decide, memory_plan, run_eval_windows, sweep_footprint
from streamprune.formats import Layout, make_format
from streamprune.pruners import Pattern, default_errors, method, resolve_sparsity
from streamprune.report import LayerReport, Report
from streamprune.stream import BlockStream, Part
from streamprune.tensorfile import ShardFile, read_tensor
from streamprune.writer import ShardWriter, copy_side_files

logger = logging.getLogger(__name__)

SWEEP_NAME = "sweep.json"
SWEEP_FILES = (SWEEP_NAME, "sweep.csv", "sweep.png")
STATE = "sweep-journal.json"
SAVE_BATCH = 16  # windows per read and write when streams are copied or saved


@dataclass(frozen=True)
class Point:
    method: str
    pattern: str  # "unstructured" or N:M
    sparsity: float

    @property
    def label(self) -> str:
        """A folder-safe name: "sparsegpt-0.50", "sparsegpt-0.125", "wanda-2of4"."""
        if self.pattern == "unstructured":
            level = f"{self.sparsity:.2f}"
            return f"{self.method}-{level if float(level) == self.sparsity else repr(self.sparsity)}"
        return f"{self.method}-{self.pattern.replace(':', 'of')}"


def sweep_points(methods: list[str], sparsities: list[float], patterns: list[str]) -> list[Point]:
    """Every method at every unstructured sparsity, then at every N:M pattern; each checked as `run` checks it."""
    if not methods:
        raise ArgumentError("sweep: --methods names no method")
    if not sparsities and not patterns:
        raise ArgumentError("sweep: give --sparsities or --patterns")
    points = []
    for name in methods:
        method(name)  # an unknown method is refused here
        for s in sparsities:
            points.append(Point(name, "unstructured", resolve_sparsity(s, Pattern.parse("unstructured"))))
        for text in patterns:
            pattern = Pattern.parse(text)
            if not pattern.structured:
                raise ArgumentError(f"sweep: pattern {text!r} is not N:M; unstructured levels go in --sparsities")
            points.append(Point(name, str(pattern), resolve_sparsity(None, pattern)))
    if len(set(points)) != len(points):
        raise ArgumentError("sweep: a point is given twice (repeated method, sparsity or pattern)")
    return points


@dataclass
class SweepResult:
    """sweep.json: one object per point, the dense figure, and how the pass went."""

    model: dict[str, Any]
    args: dict[str, Any]
    dense_perplexity: float
    points: list[dict[str, Any]]
    eval: dict[str, Any]
    reads: list[dict[str, Any]]  # per block: how many times its tensors were read (1) and the bytes
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0  # sampled during the sweep (psutil)
    process_peak_rss_bytes: int = 0  # the process's lifetime peak (VmHWM)
    peak_gpu_bytes: int = 0
    plan: dict[str, Any] = field(default_factory=dict)  # the memory plan the sweep was placed by
    phases: dict[str, float] = field(default_factory=dict)  # read, embed, save (of the streams), head
    resumed_at_block: int | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, out_dir: Path) -> None:
        with atomic_write(out_dir / SWEEP_NAME) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        with atomic_write(out_dir / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
            fields = ["method", "pattern", "sparsity", "total_sparsity", "perplexity", "seconds"]
            out = csv.writer(f)
            out.writerow(fields)
            out.writerow(["dense", "", 0.0, 0.0, f"{self.dense_perplexity:.6g}", ""])
            for p in self.points:
                out.writerow([p["method"], p["pattern"], p["sparsity"], f"{p['total_sparsity']:.6f}",
                              f"{p['perplexity']:.6g}", f"{p['seconds']:.3f}"])


@dataclass
class Lane:
    """One point's state during the sweep: its job (what BlockPruner reads), report, calibration buffers (none for
    magnitude without statistics), evaluation stream, and with --save-dir its checkpoint writer."""

    point: Point
    job: Job
    report: Report
    x: Activations | None
    scratch: Activations | None
    eval: HiddenStream
    writer: ShardWriter | None = None
    seconds: float = 0.0

    def close(self) -> None:
        for store in (self.x, self.scratch):
            if store is not None:
                store.close()
        self.eval.close()


@dataclass
class SweepJob:
    ckpt: Checkpoint
    out_dir: Path
    save_dir: Path | None
    points: list[Point]
    jobs: list[Job]
    windows: torch.Tensor
    eval_windows: torch.Tensor
    device: torch.device
    placement: str
    batch: int
    plan: MemoryPlan
    args: dict[str, Any]
    fingerprint: dict[str, Any]
    first: int  # the first unfinished block (0 unless resuming)
    state: dict[str, Any] | None  # the journal of the run resumed, if any


def plan_sweep(ckpt: Checkpoint, points: list[Point], opts: PruneOptions, seqlen: int, eval_windows: torch.Tensor,
               device: torch.device) -> MemoryPlan:
    """The memory plan of a sweep (see `sweep_footprint`), its placement and batch decided as a run's are."""
    knobs = [(p.method, {k: getattr(opts, k) for k in method(p.method).knobs}) for p in points]
    fp = sweep_footprint(ckpt, knobs, opts.nsamples, seqlen, opts.sequential, *eval_windows.shape)
    decision = decide(fp, device, opts.offload_activations, opts.max_gpu_memory, opts.batch, opts.nsamples)
    return memory_plan(fp, device, decision, points=len(points))


def sweep_plan(model_dir: str | Path, methods: list[str] | tuple[str, ...] = ("sparsegpt", "wanda", "magnitude"),
               sparsities: list[float] | tuple[float, ...] = (), patterns: list[str] | tuple[str, ...] = (),
               eval: str | Path | None = None, **options: Any) -> MemoryPlan:
    """Predicted peak memory of `streamprune sweep` with these arguments (`eval` is tokenized to count its windows;
    `options` as for `sweep`: nsamples, seqlen, device, offload_activations, max_gpu_memory, batch, sequential,
    eval_nsamples, eval_seqlen, the methods' knobs); nothing is run or allocated."""
    from streamprune.plan import planned_device

    if eval is None:
        raise DataError("a sweep's plan needs its evaluation data: pass --eval FILE")
    opts = PruneOptions(**options)
    points = sweep_points(list(methods), list(sparsities), list(patterns))
    ckpt = Checkpoint(model_dir)
    seqlen = ckpt.config.default_seqlen if opts.seqlen is None else opts.seqlen
    ewindows = run_eval_windows(ckpt, eval, opts.eval_nsamples, opts.eval_seqlen, False)
    assert ewindows is not None
    return plan_sweep(ckpt, points, opts, seqlen, ewindows, planned_device(opts.device, opts.max_gpu_memory))


def check_fits(result: MemoryPlan, opts: PruneOptions, device: torch.device, out_dir: Path) -> None:
    """Refuse, with the figures, points whose activations do not fit the placement asked for."""
    import psutil

    acts = sum(b for what, b, _ in result.consumers if "activations" in what or "hidden states" in what)
    if result.placement == "cpu":
        free = psutil.virtual_memory().available
        if result.host_peak > free:
            raise ArgumentError(f"sweep: the points need {result.host_peak / 2**30:.2f} GiB of host memory "
                                f"({acts / 2**30:.2f} GiB of activations) but {free / 2**30:.2f} GiB are available; "
                                "use fewer points, fewer windows or --offload-activations disk")
    elif result.placement == "device" and opts.max_gpu_memory is not None and device.type == "cuda":
        if result.device_peak > opts.max_gpu_memory:
            raise ArgumentError(f"sweep: the points need {result.device_peak / 2**30:.2f} GiB of GPU memory "
                                f"({acts / 2**30:.2f} GiB of activations) but --max-gpu-memory is "
                                f"{opts.max_gpu_memory / 2**30:.2f} GiB; use fewer points or --offload-activations cpu")
    dst = out_dir.resolve()
    existing = dst if dst.exists() else next(p for p in dst.parents if p.exists())
    need = 2 * acts + (acts if result.placement == "disk" else 0)  # two saved states (and the buffers on disk)
    free = shutil.disk_usage(existing).free
    if need > free:
        raise ArgumentError(f"sweep: saving the points' streams between blocks needs {need / 2**30:.2f} GiB in "
                            f"{str(existing)!r} but {free / 2**30:.2f} GiB are free")


def prepare_sweep(model_dir: Path, out_dir: Path, opts: PruneOptions, points: list[Point],
                  save_dir: Path | None) -> SweepJob | SweepResult:
    """Validate the whole sweep; returns the saved result instead when OUT_DIR already holds it, finished."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ArgumentError("sweep runs in one process: launch it without torchrun")
    if opts.calib is None:
        raise DataError("sweep needs calibration data: pass --calib FILE")
    if opts.eval is None:
        raise DataError("sweep needs evaluation data: pass --eval FILE")
    if opts.batch < 1:
        raise ArgumentError(f"batch {opts.batch!r} must be at least 1")
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    if ckpt.layout.encoded:
        raise ArgumentError(f"{str(model_dir)!r} is stored {ckpt.layout.format.name} (packed integer weights); "
                            "prune its unquantized original")
    for p in points:
        cls, pattern = method(p.method), Pattern.parse(p.pattern)
        cls.check({k: getattr(opts, k) for k in cls.knobs}, pattern)
    device = resolve_device(opts.device)
    seqlen = cfg.default_seqlen if opts.seqlen is None else opts.seqlen
    cfg.check_seqlen(seqlen)
    calib = Path(opts.calib)
    windows = calib_windows(calib, model_dir, cfg.vocab_size, seqlen, opts.nsamples, opts.seed)
    ewindows = run_eval_windows(ckpt, opts.eval, opts.eval_nsamples, opts.eval_seqlen, False)
    assert ewindows is not None
    check_out_dir(model_dir, out_dir)
    if save_dir is not None:
        check_out_dir(model_dir, save_dir)
    result = plan_sweep(ckpt, points, opts, seqlen, ewindows, device)
    check_fits(result, opts, device, out_dir)
    args = {**asdict(opts), "calib": str(calib), "seqlen": seqlen, "device": str(device), "eval": str(opts.eval),
            "eval_seqlen": ewindows.shape[1], "offload_activations": result.placement, "batch": result.batch,
            "points": [asdict(p) for p in points], "save_dir": None if save_dir is None else str(save_dir)}
    for key in ("method", "sparsity", "pattern", "eval_dense", "wbits", "format", "allocation"):
        args.pop(key)  # per point, or not for a sweep
    knobs = sorted({k for p in points for k in method(p.method).knobs})
    fprint = fingerprint(ckpt, calib_digest(calib, windows),
                         {k: args[k] for k in RESULT_OPTIONS + tuple(knobs) + ("points", "save_dir")
                          if k in args} | {"eval": calib_digest(Path(opts.eval), ewindows)})
    first, state = 0, None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        state, finished = previous_sweep(out_dir)
        if state is None and not opts.overwrite:
            raise ArgumentError(f"OUT_DIR {str(out_dir)!r} is not empty and holds no sweep of streamprune; pass "
                                "--overwrite to replace its sweep files")
        if state is not None and not (opts.overwrite or opts.restart):
            if state["fingerprint"] != fprint:
                raise ArgumentError(f"OUT_DIR {str(out_dir)!r} holds a different sweep "
                                    f"({describe_difference(state['fingerprint'], fprint)}); pass --restart to start over")
            if finished:
                logger.warning("%s already holds the finished result of this sweep", out_dir)
                raw = json.loads((out_dir / SWEEP_NAME).read_text())
                return SweepResult(**raw)
            first = state["blocks_done"]
        else:
            state = None
    jobs = [point_job(ckpt, opts, p, out_dir if save_dir is None else save_dir / p.label, seqlen, device, windows,
                      ewindows, result) for p in points]
    return SweepJob(ckpt, out_dir, save_dir, points, jobs, windows, ewindows, device, result.placement, result.batch,
                    result, args, fprint, first, state)


def point_job(ckpt: Checkpoint, opts: PruneOptions, p: Point, out_dir: Path, seqlen: int, device: torch.device,
              windows: torch.Tensor, ewindows: torch.Tensor, result: MemoryPlan) -> Job:
    """What BlockPruner needs of one point, as `prepare` would give it for `run` with the point's method."""
    cls = method(p.method)
    errors = default_errors(cls, opts.layer_errors)
    popts = replace(opts, method=p.method, pattern=p.pattern, sparsity=p.sparsity)
    return Job(ckpt=ckpt, opts=popts, out_dir=out_dir, pattern=Pattern.parse(p.pattern), sparsity=p.sparsity,
               errors=errors, knobs={k: getattr(opts, k) for k in cls.knobs}, seqlen=seqlen, device=device,
               windows=windows if cls.accumulates(errors) else None, placement=result.placement, batch=result.batch,
               offload_hessian=result.offload_hessian, grid=None,
               args={**asdict(popts), "calib": str(opts.calib), "eval": str(opts.eval), "seqlen": seqlen,
                     "device": str(device)},
               fingerprint={}, journal=None, layout=Layout(make_format("dense", None), frozenset(output_linears(ckpt))),
               eval_windows=ewindows)


def previous_sweep(out_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """The journal of the sweep in OUT_DIR (None if there is none) and whether it finished."""
    path = out_dir / WORK_DIR / STATE
    if path.is_file():
        try:
            return json.loads(path.read_text()), False
        except ValueError:
            return None, False
    if (out_dir / SWEEP_NAME).is_file():
        try:
            raw = json.loads((out_dir / SWEEP_NAME).read_text())
            return {"fingerprint": raw["fingerprint"]}, True
        except (ValueError, KeyError, TypeError):
            return None, False
    return None, False


class Sweep:
    """One execution of a prepared sweep, resuming from its journal when there is one."""

    def __init__(self, job: SweepJob, progress: bool) -> None:
        self.job, self.progress = job, progress
        self.ckpt, self.cfg = job.ckpt, job.ckpt.config
        self.phases = dict.fromkeys(("read", "embed", "save", "head"), 0.0)
        self.reads: dict[int, dict[str, Any]] = {}

    def execute(self) -> SweepResult:
        job, cfg = self.job, self.cfg
        start = time.perf_counter()
        out, work = job.out_dir, job.out_dir / WORK_DIR
        if job.state is None:
            out.mkdir(parents=True, exist_ok=True)
            for name in SWEEP_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(exist_ok=True)
        with PeakMemory(job.device) as mem, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
            TimeElapsedColumn(), disable=not self.progress, transient=True,
        ) as bar:
            task = bar.add_task("embed", total=cfg.n_layers, completed=job.first)
            dense, lanes = self.streams(work)
            try:
                pos = positions(cfg, job.windows.shape[1]).to(job.device, torch.float32)
                for block in BlockStream(self.ckpt, job.device, range(job.first, cfg.n_layers)):
                    bid = block.bid
                    bar.update(task, description=f"block {bid}: {len(lanes)} points")
                    self.phases["read"] += block.wait_seconds
                    self.reads[bid] = {"block": bid, "reads": self.reads.get(bid, {}).get("reads", 0) + 1,
                                       "bytes": sum(t.nbytes for t in block.raw.values()),
                                       "seconds": block.read_seconds}
                    if self.ckpt.n_experts(bid):
                        self.moe_block(block, dense, lanes, pos.of(bid))
                    else:
                        dense.enter(bid, block.w)
                        dense.leave()
                        for i, lane in enumerate(lanes):
                            self.prune_lane(i, lane, block, pos.of(bid))
                    self.save_state(bid + 1, dense, lanes)
                    del block
                    release_freed_memory()
                    bar.advance(task)
                bar.update(task, description="head")
                t = time.perf_counter()
                dense_ppl = perplexity(dense)
                ppl = [perplexity(lane.eval) for lane in lanes]
                self.phases["head"] += time.perf_counter() - t
            finally:
                dense.close()
                for lane in lanes:
                    lane.close()
            if job.save_dir is not None:
                for lane in lanes:
                    self.finish_checkpoint(lane)
        result = SweepResult(
            model={"dir": str(self.ckpt.dir), "model_type": cfg.model_type, "n_layers": cfg.n_layers,
                   "name": self.ckpt.dir.resolve().name},
            args=job.args, dense_perplexity=dense_ppl,
            points=[self.point_row(lane, p) for lane, p in zip(lanes, ppl)],
            eval={"file": str(job.args["eval"]), "windows": job.eval_windows.shape[0],
                  "seqlen": job.eval_windows.shape[1]},
            reads=[self.reads[b] for b in sorted(self.reads)], wall_seconds=time.perf_counter() - start,
            peak_rss_bytes=mem.peak_rss, process_peak_rss_bytes=os_peak_rss(), peak_gpu_bytes=mem.peak_gpu,
            plan=job.plan.to_dict(), phases=self.phases,
            resumed_at_block=job.first if job.state is not None else None, fingerprint=job.fingerprint)
        result.save(out)
        plot(result, out / "sweep.png")
        shutil.rmtree(work, ignore_errors=True)
        return result

    def streams(self, work: Path) -> tuple[HiddenStream, list[Lane]]:
        """The dense evaluation stream and each point's lane: embedded once, copied to every point (or, resuming,
        loaded from the state saved after the last finished block)."""
        job, cfg = self.job, self.cfg
        t = time.perf_counter()
        K, T = job.eval_windows.shape
        N, S = job.windows.shape
        D = cfg.hidden_size

        def store(shape: tuple[int, int, int], name: str) -> Activations:
            return make_store(shape, job.placement, job.device, work, name)

        moe = bool(cfg.n_experts)  # an MoE block writes its output into a second buffer

        def eval_stores(name: str) -> tuple[Activations, Activations | None]:
            return store((K, T, D), f"{name}0"), store((K, T, D), f"{name}1") if moe else None

        dense = HiddenStream(self.ckpt, job.eval_windows, job.device, job.batch, *eval_stores("eval-dense"),
                             embed=job.state is None)
        calib = None
        if job.state is None and any(j.windows is not None for j in job.jobs):
            calib = store((N, S, D), "calib-embedded")
            embed_windows(self.ckpt, job.windows, job.device, calib, job.batch)
        lanes = []
        for i, (p, pj) in enumerate(zip(job.points, job.jobs)):
            report = Report(args=pj.args, model={})
            x = scratch = None
            if pj.windows is not None:
                x, scratch = store((N, S, D), f"p{i}-calib0"), store((N, S, D), f"p{i}-calib1")
                if calib is not None:
                    copy_store(calib, x, SAVE_BATCH)
            stream = HiddenStream(self.ckpt, job.eval_windows, job.device, job.batch, *eval_stores(f"p{i}-eval"),
                                  embed=False)
            if job.state is None:
                copy_store(dense.x, stream.x, SAVE_BATCH)
            lane = Lane(p, pj, report, x, scratch, stream)
            if job.save_dir is not None:
                lane.writer = ShardWriter(pj.out_dir, cfg.n_layers + 1)
            lanes.append(lane)
        if calib is not None:
            calib.close()
        if job.state is None:
            self.start_checkpoints(lanes)
        else:
            self.load_state(dense, lanes)
        self.phases["embed"] += time.perf_counter() - t
        return dense, lanes

    def prune_lane(self, i: int, lane: Lane, block: Part, pos: Positions) -> None:
        """One point's dense block: its copy of the weights pruned (written with --save-dir), then its streams
        through it."""
        job, bid = lane.job, block.bid
        clock = job.clock
        t = clock()
        w = dict(block.w)  # the pruners replace the entries they prune; the block's own tensors stay dense
        with self.shard(i, lane, block) as shard:
            BlockPruner(job, lane.report).run(bid, w, lane.x, pos, shard.put)
        if lane.x is not None:
            assert lane.scratch is not None
            f = clock()
            forward_block(self.ckpt, w, lane.x, pos, lane.scratch, job.batch, job.device)
            lane.x, lane.scratch = lane.scratch, lane.x
            lane.report.add("forward", clock() - f, bid)
        e = clock()
        lane.eval.enter(bid, w)
        lane.eval.leave()
        lane.report.add("eval", clock() - e, bid)
        lane.seconds += clock() - t

    def moe_block(self, block: Part, dense: HiddenStream, lanes: list[Lane], pos: Positions) -> None:
        """A block with routed experts: every point prunes its copy of the block outside the experts (and, with
        --sequential, runs its first pass), then each expert, read once, goes to every point in turn (pruned, its
        output added to the point's calibration and evaluation streams), as `run` does for one point."""
        bid = block.bid
        dense.enter(bid, block.w)
        sequential = self.job.jobs[0].opts.sequential
        with ExitStack() as shards:
            steps = []
            for i, lane in enumerate(lanes):
                t = lane.job.clock()
                w = dict(block.w)
                shard = shards.enter_context(self.shard(i, lane, block, read_back=not sequential))
                pruner = BlockPruner(lane.job, lane.report)
                m_store = lane.scratch if lane.x is not None and not sequential else None
                routes = pruner.run(bid, w, lane.x, pos, shard.put, m_store=m_store)
                e = lane.job.clock()
                lane.eval.enter(bid, w)
                lane.report.add("eval", lane.job.clock() - e, bid)
                step = pruner.expert_steps(bid, w, lane.x, lane.scratch, pos, shard, routes, lambda e: None,
                                           self.timed(lane, lane.eval.expert))
                next(step)
                steps.append(step)
                lane.seconds += lane.job.clock() - t
            for expert in block.experts():
                self.reads[bid]["bytes"] += sum(t.nbytes for t in expert.raw.values())
                self.reads[bid]["seconds"] += expert.read_seconds
                self.phases["read"] += expert.wait_seconds
                dense.expert(expert)
                for lane, step in zip(lanes, steps):
                    t = lane.job.clock()
                    step.send(Part(bid, {}, dict(expert.w), 0.0, 0.0, expert.xid))  # its own copy to prune
                    lane.seconds += lane.job.clock() - t
                del expert
            for lane, step in zip(lanes, steps):
                t = lane.job.clock()
                with suppress(StopIteration):
                    step.send(None)  # without --sequential: the pruned block's forward, its experts read back
                lane.seconds += lane.job.clock() - t
        dense.leave()
        for lane in lanes:
            lane.eval.leave()
            if lane.x is not None:
                lane.x, lane.scratch = lane.scratch, lane.x

    @staticmethod
    def timed(lane: Lane, step: Any) -> Any:
        def run(part: Part) -> None:
            t = lane.job.clock()
            step(part)
            lane.report.add("eval", lane.job.clock() - t, part.bid)
        return run

    @contextmanager
    def shard(self, i: int, lane: Lane, block: Part, read_back: bool = False) -> Iterator[Any]:
        """Where a point's pruned tensors go: its checkpoint's shard with --save-dir (the block's other tensors put
        now); with `read_back` (an MoE block's pruned experts, read back by the forward without --sequential) a
        temporary shard in the work folder, removed after the block; else nowhere."""
        bid = block.bid
        meta = block_meta(self.ckpt, bid, lane.job.layout)
        if lane.writer is not None:
            context = lane.writer.open(bid + 1, meta)
        elif read_back:
            context = temporary_shard(self.job.out_dir / WORK_DIR / f"p{i}-block.safetensors", meta)
        else:
            yield NoShard()
            return
        with context as shard:
            pruned = set(self.ckpt.pruned_linears(bid).values())
            for name, tensor in block.raw.items():
                if name not in pruned:
                    shard.put(name, tensor)
            yield shard

    def start_checkpoints(self, lanes: list[Lane]) -> None:
        """--save-dir: each point's folder, cleared of a previous sweep's files, and its first shard (the tensors
        outside the blocks, read once and written to every point)."""
        writers = [lane.writer for lane in lanes if lane.writer is not None]
        if not writers:
            return
        names = self.ckpt.stored_names(None)
        meta = {n: (self.ckpt.tensors[n].torch_dtype, tuple(self.ckpt.tensors[n].shape)) for n in names}
        for writer in writers:
            writer.dir.mkdir(parents=True, exist_ok=True)
            for path in writer.dir.glob("*.safetensors*"):
                path.unlink()
        with ExitStack() as stack:
            files = [stack.enter_context(w.open(0, meta)) for w in writers]
            for name in sorted(names):
                tensor = read_tensor(self.ckpt.tensors[name])
                for f in files:
                    f.put(name, tensor)

    def finish_checkpoint(self, lane: Lane) -> None:
        assert lane.writer is not None
        copy_side_files(self.ckpt.dir, lane.writer.dir)
        finish_config(self.ckpt, lane.writer.dir, lane.job.layout)
        lane.writer.finish()
        lane.report.total_sparsity = total_sparsity(lane.report.layers)
        lane.report.save(lane.writer.dir)

    def save_state(self, done: int, dense: HiddenStream, lanes: list[Lane]) -> None:
        """Every stream after block `done - 1`, into the folder of this block's parity (the other one holds the
        previous state until the journal names this one), then the journal."""
        t = time.perf_counter()
        folder = self.job.out_dir / WORK_DIR / f"state{done % 2}"
        folder.mkdir(exist_ok=True)
        save_store(dense.x, folder / "eval-dense.f32", SAVE_BATCH)
        for i, lane in enumerate(lanes):
            if lane.x is not None:
                save_store(lane.x, folder / f"p{i}-calib.f32", SAVE_BATCH)
            save_store(lane.eval.x, folder / f"p{i}-eval.f32", SAVE_BATCH)
        state = {"fingerprint": self.job.fingerprint, "blocks_done": done,
                 "points": [{"layers": [asdict(lr) for lr in lane.report.layers], "phases": lane.report.phases,
                             "seconds": lane.seconds} for lane in lanes],
                 "reads": self.reads, "phases": self.phases}
        with atomic_write(self.job.out_dir / WORK_DIR / STATE) as tmp:
            tmp.write_text(json.dumps(state))
        self.phases["save"] += time.perf_counter() - t

    def load_state(self, dense: HiddenStream, lanes: list[Lane]) -> None:
        state = self.job.state
        assert state is not None
        done = state["blocks_done"]
        folder = self.job.out_dir / WORK_DIR / f"state{done % 2}"
        load_store(dense.x, folder / "eval-dense.f32", SAVE_BATCH)
        for i, (lane, saved) in enumerate(zip(lanes, state["points"])):
            if lane.x is not None:
                load_store(lane.x, folder / f"p{i}-calib.f32", SAVE_BATCH)
            load_store(lane.eval.x, folder / f"p{i}-eval.f32", SAVE_BATCH)
            lane.report.layers = [LayerReport(**lr) for lr in saved["layers"]]
            lane.report.phases.update(saved["phases"])
            lane.seconds = saved["seconds"]
            if lane.writer is not None:
                missing = [lane.writer.shard_name(b) for b in range(done + 1)
                           if not (lane.writer.dir / lane.writer.shard_name(b)).is_file()]
                if missing:
                    raise ArgumentError(f"{lane.writer.dir}: {missing[0]} of the saved point is gone; rerun with "
                                        "--restart")
        self.reads = {int(k): v for k, v in state["reads"].items()}
        self.phases.update(state["phases"])

    def point_row(self, lane: Lane, ppl: float) -> dict[str, Any]:
        p, report = lane.point, lane.report
        return {"method": p.method, "pattern": p.pattern, "sparsity": p.sparsity, "label": p.label,
                "perplexity": ppl, "total_sparsity": total_sparsity(report.layers), "seconds": lane.seconds,
                "phases": {k: v for k, v in report.phases.items() if v},
                "checkpoint": None if lane.writer is None else str(lane.writer.dir)}


@contextmanager
def temporary_shard(path: Path, meta: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> Iterator[ShardFile]:
    try:
        with ShardFile(path, meta) as shard:
            yield shard
    finally:
        path.unlink(missing_ok=True)


def total_sparsity(layers: list[LayerReport]) -> float:
    numel = sum(lr.shape[0] * lr.shape[1] for lr in layers)
    return sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in layers) / numel if numel else 0.0


def perplexity(stream: HiddenStream) -> float:
    total, count = stream.nll()
    return math.exp(total / count)


def plot(result: SweepResult, path: Path) -> bool:
    """sweep.png: perplexity against sparsity, one line per method (N:M points as markers at their sparsity) and
    the dense model's as a reference; skipped with a notice when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'streamprune[plot]'): %s not drawn", path.name)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    methods = list(dict.fromkeys(p["method"] for p in result.points))
    markers = "osv^Dx*"
    for i, name in enumerate(methods):
        line = sorted((p["sparsity"], p["perplexity"]) for p in result.points
                      if p["method"] == name and p["pattern"] == "unstructured")
        color = f"C{i}"
        if line:
            ax.plot(*zip(*line), marker=markers[i % len(markers)], color=color, label=name)
        for p in result.points:
            if p["method"] == name and p["pattern"] != "unstructured":
                ax.scatter([p["sparsity"]], [p["perplexity"]], marker="s", facecolors="none", edgecolors=color,
                           s=60, label=f"{name} {p['pattern']}")
    ax.axhline(result.dense_perplexity, color="gray", linestyle="--", label=f"dense {result.dense_perplexity:.2f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"perplexity ({result.eval['windows']} x {result.eval['seqlen']} tokens, log scale)")
    ax.set_title(f"{result.model['name']}: perplexity against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def summary_table(result: SweepResult) -> Table:
    table = Table(title=f"streamprune sweep: {result.model['name']} "
                        f"({result.eval['windows']} windows x {result.eval['seqlen']} tokens)")
    for col in ("method", "pattern", "sparsity", "perplexity", "change", "seconds"):
        table.add_column(col, justify="left" if col in ("method", "pattern") else "right")
    dense = result.dense_perplexity
    table.add_row("dense", "", "0", f"{dense:.4f}", "", "")
    for p in result.points:
        table.add_row(p["method"], p["pattern"], f"{p['total_sparsity']:.4f}", f"{p['perplexity']:.4f}",
                      f"{p['perplexity'] - dense:+.4f}", f"{p['seconds']:.1f}")
    reads = {r["reads"] for r in result.reads}
    table.caption = (f"wall {result.wall_seconds:.1f}s; each of {len(result.reads)} blocks read "
                     f"{'/'.join(map(str, sorted(reads)))} time(s); peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB "
                     f"(planned {result.plan.get('host_peak_bytes', 0) / 2**20:.0f} MiB)")
    return table


def sweep(model_dir: str | Path, out_dir: str | Path, methods: list[str] | tuple[str, ...] = ("sparsegpt", "wanda",
          "magnitude"), sparsities: list[float] | tuple[float, ...] = (), patterns: list[str] | tuple[str, ...] = (),
          save_dir: str | Path | None = None, progress: bool = False, **options: Any) -> SweepResult:
    """Prune and evaluate every (method, level) point in one read of the checkpoint.

    Args:
        model_dir: Hugging Face model directory; only read.
        out_dir: where sweep.json, sweep.csv and sweep.png go (and, while it runs, the resumable state).
        methods: pruning methods; each is swept over `sparsities` (unstructured) and `patterns` (N:M).
        sparsities: unstructured levels in [0, 1).
        patterns: N:M patterns such as "2:4".
        save_dir: also write each point's pruned checkpoint into save_dir/<method>-<level>.
        progress: show a progress bar over blocks.
        **options: fields of `PruneOptions` that `run` takes for calibration and evaluation (calib and eval are
            required): calib, nsamples, seqlen, seed, device, sequential, blocksize, damp, batch, layer_errors,
            offload_activations, max_gpu_memory, eval, eval_nsamples, eval_seqlen, overwrite, restart, and the
            methods' own knobs.
    """
    # per point (the first three), or what a sweep does not vary: quantization, OWL's allocation (a run's options)
    not_sweep = {"method", "sparsity", "pattern", "wbits", "group_size", "sym", "format", "eval_dense", "profile_memory",
                 "allocation", "owl_lambda", "owl_m"}
    unknown = set(options) - (set(PruneOptions.__dataclass_fields__) - not_sweep)
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    points = sweep_points(list(methods), list(sparsities), list(patterns))
    job = prepare_sweep(Path(model_dir), Path(out_dir), PruneOptions(**options), points,
                        None if save_dir is None else Path(save_dir))
    if isinstance(job, SweepResult):
        return job
    return Sweep(job, progress).execute()

"""`prune` and `sweep`: each builds the list of consumers of the block loop (`loop.walk`) and runs it once.

    prune   [reads, dense stream (--eval-dense), pruning lane]                    then the head; OUT_DIR finished
    sweep   [reads, dense stream, a lane per point, state saved after each block]  then the head of every stream

Only one decoder block's weights are held at a time (plus the next one, read ahead). Each lane's calibration hidden
states live in two buffers (block input and block output) that swap roles after each block. A run journals each
shard once it is in place, so a rerun of the same command replays the blocks it has written (its calibration and
evaluation streams brought to the first unfinished block) and goes on from there; a sweep saves its streams after
each block and resumes from them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from streamprune.activations import DiskActivations, copy_store, load_store, make_store, save_store
from streamprune.arch.block import positions
from streamprune.checkpoint import Checkpoint
from streamprune.dist import Ranks
from streamprune.errors import ArgumentError
from streamprune.hidden import HiddenStream
from streamprune.fileio import atomic_write
from streamprune.forward import embed_windows
from streamprune.job import Job, SweepJob, clear_previous_output, prepare, prepare_sweep
from streamprune.journal import WORK_DIR, Journal, environment
from streamprune.lane import PruneLane
from streamprune.loop import Consumer, ReadLog, Status, Timed, tracked, walk
from streamprune.memory import MEMORY_CSV, PeakMemory, os_peak_rss
from streamprune.options import RUN, SWEEP, PruneOptions
from streamprune.owl import Allocation, OutlierRatios, allocate, pruned_counts
from streamprune.report import LayerReport, Report, quantization_summary, total_sparsity
from streamprune.stream import BlockStream, Part
from streamprune.sweep import SWEEP_JOURNAL, Point, SweepResult, plot
from streamprune.writer import CheckpointSink, NoSink, Sink, write_globals

logger = logging.getLogger(__name__)

SAVE_BATCH = 16  # windows per read and write when a sweep's streams are copied or saved


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
        **options: the options of `streamprune run` (see `streamprune.options.PruneOptions`, or
            `streamprune run --help`), e.g. method="sparsegpt", sparsity=0.5, calib="data.txt".

    Returns:
        The run report, also saved as OUT_DIR/streamprune_report.json.
    """
    ranks = Ranks.from_env() if ranks is None else ranks
    job = prepare(Path(model_dir), Path(out_dir), PruneOptions.of(RUN, options), ranks)
    if isinstance(job, Report):
        return job
    ranks.barrier()  # every rank has read OUT_DIR (its journal) before rank 0 writes there
    return Run(job).execute(progress and ranks.is_writer)


def sweep(model_dir: str | Path, out_dir: str | Path, progress: bool = False, **options: Any) -> SweepResult:
    """Prune and evaluate every (method, level) point in one read of the checkpoint.

    Args:
        model_dir: Hugging Face model directory; only read.
        out_dir: where sweep.json, sweep.csv and sweep.png go (and, while it runs, the resumable state).
        progress: show a progress bar over blocks.
        **options: the options of `streamprune sweep` (see `streamprune.options.PruneOptions`): methods (each
            swept over the unstructured `sparsities` and the N:M `patterns`), save_dir (also write each point's
            pruned checkpoint into save_dir/<method>-<level>), calib and eval (required), and the calibration,
            evaluation and placement options that `run` takes.
    """
    job = prepare_sweep(Path(model_dir), Path(out_dir), PruneOptions.of(SWEEP, options))
    if isinstance(job, SweepResult):
        return job
    return Sweep(job).execute(progress)


class Run:
    """One execution of a prepared run, resuming from its journal when there is one. Rank 0 alone writes the output,
    the journal and the report."""

    def __init__(self, job: Job) -> None:
        self.job, self.ckpt, self.ranks = job, job.ckpt, job.ranks
        if job.opts.threads is not None:
            torch.set_num_threads(job.opts.threads)
        env = environment(job.device)
        if self.ranks.distributed:  # like the thread count: the order of the sums, not the result, depends on it
            env["world_size"] = self.ranks.world
        self.journal = job.journal or Journal(job.fingerprint, environment=env)
        cfg = self.ckpt.config
        self.report = Report(args=job.args, model={"dir": str(self.ckpt.dir), "model_type": cfg.model_type,
                                                   "n_layers": cfg.n_layers,
                                                   "dtype": str(self.ckpt.dtype).removeprefix("torch."),
                                                   **mtp_layers(self.ckpt, job.out)},
                             fingerprint=job.fingerprint, environment=env)
        self.report.device = job.device
        self.report.expert_scores = None if job.removal is None else job.removal.source
        before = self.journal.environment
        self.report.environment_changes = [f"{k}: {before.get(k)!r} before, {v!r} now" for k, v in env.items()
                                           if before.get(k) != v]
        if self.report.environment_changes:
            logger.warning("resuming in another environment (%s): the result is valid but its last bits may differ "
                           "from an uninterrupted run's", "; ".join(self.report.environment_changes))
        self.sink: Sink = CheckpointSink(job.out, job.out_dir, job.layout, self.journal) if self.ranks.is_writer \
            else NoSink()

    def execute(self, progress: bool) -> Report:
        job, report = self.job, self.report
        start = time.perf_counter()
        first = self.start()
        with PeakMemory(job.device, record=job.opts.profile_memory) as mem, \
                tracked(mem, self.ckpt.config.n_layers, first, progress) as status:
            calib = self.calibration_stream()
            allocation = self.allocate(calib, status)
            status.phase("embed")
            if calib is not None:
                calib.embed()
            streams = self.eval_streams(status)  # --eval: "pruned", and with --eval-dense "dense"
            tasks = self.task_streams()  # --eval-tasks: the same
            self.replay(first, calib, streams, tasks, status)
            pruned = [*streams.get("pruned", []), *tasks.get("pruned", [])]
            dense = [Timed(s, report, "eval") for s in (*streams.get("dense", []), *tasks.get("dense", []))]
            lane = PruneLane(job, report, self.sink, calib, pruned, status, allocation)
            reads = ReadLog()
            try:
                walk(BlockStream(self.ckpt, job.device, range(first, self.ckpt.config.n_layers)),
                     [reads, *dense, lane], status)
            finally:
                lane.close()
                if calib is not None:
                    if (io := disk_io(calib)) is not None:
                        report.activation_io = {**io, **(report.activation_io or {})}
                    calib.close()
            reads.into(report)
            self.perplexities(streams, status)
            self.task_results(tasks, status)
            status.phase("finish")
            self.sink.finish()
        return self.finish(start, mem)

    def start(self) -> int:
        """OUT_DIR made ready (cleared for a new run), the tensors outside the blocks written (copied bit for bit,
        one tensor in memory at a time), and the finished blocks' report rows taken from the journal; returns the
        first unfinished block, from which the run goes on."""
        job, out = self.job, self.job.out_dir
        if self.ranks.is_writer:
            if job.journal is None:
                out.mkdir(parents=True, exist_ok=True)
                clear_previous_output(out, RUN, every_checkpoint_file=job.opts.overwrite)
            self.journal.save(out)
        self.ranks.barrier()  # OUT_DIR cleared before any rank puts its temporary files there
        if 0 not in self.journal.done and self.ranks.is_writer:
            with self.report.timed("write"):
                write_globals(job.out, [self.sink])
        first = 0
        while first + 1 in self.journal.done:
            first += 1
        for idx in [i for i in self.journal.done if i > first]:  # redo everything after the first gap
            del self.journal.done[idx]
        for idx in sorted(self.journal.done):  # the finished blocks' report rows (and choices of experts)
            self.report.layers += [LayerReport(**lr) for lr in self.journal.done[idx]["layers"]]
            if "experts" in self.journal.done[idx]:
                self.report.experts = [*(self.report.experts or []), self.journal.done[idx]["experts"]]
        self.report.resumed_at_block = first if job.journal else None
        return first

    def calibration_stream(self) -> HiddenStream | None:
        """The calibration windows' hidden states in two buffers (block input and output), placed as planned and
        not yet embedded; None when the method reads no statistics."""
        job = self.job
        if job.windows is None:
            return None
        shape = (job.windows.shape[0], job.seqlen, self.ckpt.config.hidden_size)
        x, scratch = (make_store(shape, job.placement, job.device, job.work, f"act{i}") for i in (0, 1))
        return HiddenStream(self.ckpt, job.windows, job.device, job.batch, x, scratch, embed=False)

    def allocate(self, calib: HiddenStream | None, status: Status) -> Allocation | None:
        """--allocation owl: the block sparsities, from the journal when a previous run of this job computed them,
        else from a forward of the dense model over the calibration windows (in the calibration buffer, still free,
        or for magnitude, whose run has none, in a buffer of its own), saved in the journal before block 0."""
        job, cfg, report = self.job, self.ckpt.config, self.report
        if job.owl_windows is None:
            report.block_sparsity = [job.sparsity] * cfg.n_layers
            return None
        if self.journal.allocation is not None:
            allocation = Allocation(**self.journal.allocation)
        elif cfg.per_layer_dim:
            raise ArgumentError("--allocation owl is not supported for a model with per-layer inputs (Gemma 4's edge "
                                "models); use --allocation uniform")
        else:
            with report.timed("owl"):
                stream = calib or HiddenStream(
                    self.ckpt, job.owl_windows, job.device, job.batch, embed=False,
                    store=make_store((job.owl_windows.shape[0], job.seqlen, cfg.hidden_size), job.placement,
                                     job.device, job.out_dir / WORK_DIR, "owl"))
                status.phase("owl: embed")
                embed_windows(self.ckpt, job.owl_windows, job.device, stream.x, job.batch)
                ratios = OutlierRatios(self.ckpt, stream.x, stream.pos, job.batch, job.device, job.opts.owl_m,
                                       reduce=self.ranks.all_reduce_sum)  # every rank's share of the windows
                walk(BlockStream(self.ckpt, job.device, range(cfg.n_layers)), [ratios], status.also("owl: ", cfg.n_layers))
                if stream is not calib:
                    stream.close()
            weights = pruned_counts(self.ckpt)
            allocation = Allocation("owl", job.opts.owl_lambda, job.opts.owl_m, ratios.ratios, weights,
                                    allocate(ratios.ratios, weights, job.sparsity, job.opts.owl_lambda))
            self.journal.allocation = allocation.to_dict()
            if self.ranks.is_writer:
                self.journal.save(job.out_dir)
        report.block_sparsity, report.allocation = allocation.block_sparsity, allocation.to_dict()
        return allocation

    def eval_streams(self, status: Status) -> dict[str, list[HiddenStream]]:
        """--eval: the evaluation windows, embedded, in a stream of the pruned model ("pruned") and with --eval-dense
        one of the dense model ("dense"), their buffers placed like the calibration activations."""
        job = self.job
        if job.eval_windows is None:
            return {}
        K, T = job.eval_windows.shape
        shape = (K, T, self.ckpt.config.hidden_size)
        streams = {}
        for name in ["pruned"] + (["dense"] if job.opts.eval_dense else []):
            status.phase(f"eval: embed ({name})")
            stores = [make_store(shape, job.placement, job.device, job.work, f"eval-{name}{i}")
                      for i in range(2 if self.ckpt.config.n_experts else 1)]
            streams[name] = [HiddenStream(self.ckpt, job.eval_windows, job.device, job.batch, *stores)]
        return streams

    def task_streams(self) -> dict[str, Any]:
        """--eval-tasks: the tasks' sequences, embedded, in streams of the pruned model ("pruned") and with
        --eval-dense of the dense model ("dense") (`tasks.TaskStreams`, one stream per bucket of lengths)."""
        job = self.job
        if job.tasks is None:
            return {}
        from streamprune.tasks import TaskStreams

        return {name: TaskStreams(self.ckpt, job.task_sequences, job.device, job.batch, job.placement, job.work,
                                  f"tasks-{name}") for name in ["pruned"] + (["dense"] if job.opts.eval_dense else [])}

    def replay(self, first: int, calib: HiddenStream | None, streams: dict[str, list[HiddenStream]],
               tasks: dict[str, Any], status: Status) -> None:
        """A resumed run's streams brought to block `first`: the dense ones through the input's blocks, the
        calibration and pruned ones through the blocks written (each routed expert read once for all)."""
        if not first:
            return
        job = self.job
        with self.report.timed("replay"):
            dense: list[Consumer] = [*streams.get("dense", []), *tasks.get("dense", [])]
            if dense:
                status.phase("replay eval (dense)")
                walk(BlockStream(self.ckpt, job.device, range(first)), dense)
            written: list[Consumer] = [*([calib] if calib is not None else []), *streams.get("pruned", []),
                                       *tasks.get("pruned", [])]
            if written:
                status.phase("replay")
                walk(BlockStream(job.out, job.device, range(first), layout=job.layout,
                                 shard_of=lambda bid: job.out_dir / self.journal.done[bid + 1]["shard"]), written)

    def perplexities(self, streams: dict[str, list[HiddenStream]], status: Status) -> None:
        """The report's perplexities: each stream through the final norm and the head."""
        if not streams:
            return
        status.phase("eval: head")
        ppl = {}
        with self.report.timed("eval"):
            for name, (stream,) in streams.items():
                total, count = stream.nll()  # this rank's windows: summed over the ranks
                total, count = self.ranks.sum_float(total), self.ranks.sum_int(count)
                ppl[name] = math.exp(total / count)
                stream.close()
        windows = self.job.eval_windows
        assert windows is not None
        self.report.perplexity, self.report.dense_perplexity = ppl["pruned"], ppl.get("dense")
        self.report.eval = {"file": str(self.job.opts.eval), "windows": self.ranks.sum_int(windows.shape[0]),
                            "seqlen": windows.shape[1], "tokens": count}

    def task_results(self, tasks: dict[str, Any], status: Status) -> None:
        """--eval-tasks: each continuation scored off the head, and lm-eval's metrics of them in the report."""
        job = self.job
        if not tasks:
            return
        from streamprune.tasks import to_json

        status.phase("eval: tasks")
        results = {}
        with self.report.timed("eval"):
            for name, streams in tasks.items():
                results[name] = to_json(job.tasks.answer(streams.scores()))["results"]
                streams.close()
        self.report.tasks = {"tasks": list(job.opts.eval_tasks), "num_fewshot": job.opts.num_fewshot,
                             "limit": job.opts.limit, "sequences": len(job.task_sequences),
                             "results": results["pruned"], "dense_results": results.get("dense")}

    def finish(self, start: float, mem: PeakMemory) -> Report:
        """The report's totals and memory figures; rank 0 saves it (and the memory profile) and removes the work
        folder."""
        job, report, ranks, out = self.job, self.report, self.ranks, self.job.out_dir
        report.read_hidden_seconds = max(0.0, report.read_total_seconds - report.phases["read"])
        report.total_sparsity = total_sparsity(report.layers)
        if job.grid is not None:
            report.quantization = quantization_summary(job.grid, self.ckpt, report.layers)
        report.wall_seconds = time.perf_counter() - start
        report.peak_rss_bytes, report.peak_gpu_bytes, report.peak_rss_phase = mem.peak_rss, mem.peak_gpu, mem.peak_phase
        report.process_peak_rss_bytes = os_peak_rss()
        if ranks.distributed:  # each rank's figures, in rank order, for rank 0's report
            report.world_size = ranks.world
            report.ranks = ranks.all_gather({
                "rank": ranks.rank, "device": str(job.device), "windows": 0 if job.windows is None else len(job.windows),
                "wall_seconds": time.perf_counter() - start, "phases": report.phases,
                "peak_rss_bytes": mem.peak_rss, "peak_gpu_bytes": mem.peak_gpu})
        if not ranks.is_writer:
            return report
        if job.opts.profile_memory:
            mem.write_csv(out / MEMORY_CSV)
            report.memory_profile = {"csv": MEMORY_CSV, "samples": len(mem.samples), "interval_seconds": mem.interval,
                                     "peak_rss_bytes": mem.peak_rss, "peak_rss_phase": mem.peak_phase,
                                     "peak_gpu_bytes": mem.peak_gpu}
        report.save(out)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        return report


class Sweep:
    """One execution of a prepared sweep, resuming from its saved state when there is one."""

    def __init__(self, job: SweepJob) -> None:
        self.job, self.ckpt = job, job.ckpt
        if job.args["threads"] is not None:
            torch.set_num_threads(job.args["threads"])
        self.work = job.out_dir / WORK_DIR
        self.own = Report(args=job.args, model={}, phases=dict.fromkeys(("read", "embed", "save", "head"), 0.0))
        self.own.device = job.device

    def execute(self, progress: bool) -> SweepResult:
        job, cfg = self.job, self.ckpt.config
        start = time.perf_counter()
        if job.state is None:
            job.out_dir.mkdir(parents=True, exist_ok=True)
            clear_previous_output(job.out_dir, SWEEP)
        self.work.mkdir(exist_ok=True)
        with PeakMemory(job.device) as mem, tracked(mem, cfg.n_layers, job.first, progress) as status:
            dense, lanes = self.streams(status)
            reads = ReadLog({int(k): v for k, v in (job.state or {}).get("reads", {}).items()})
            try:
                walk(BlockStream(self.ckpt, job.device, range(job.first, cfg.n_layers)),
                     [reads, dense, *lanes, SavedState(self, dense, lanes, reads)], status)
                status.phase("head")
                with self.own.timed("head"):
                    dense_ppl = perplexity(dense)
                    ppl = [perplexity(lane.streams[0]) for lane in lanes]
            finally:
                for stream in [dense] + [s for lane in lanes for s in (lane.calib, *lane.streams) if s is not None]:
                    stream.close()
                for lane in lanes:
                    lane.close()
            for lane in lanes:
                lane.sink.finish()
                if job.save_dir is not None:
                    lane.report.total_sparsity = total_sparsity(lane.report.layers)
                    lane.report.save(lane.job.out_dir)
        self.own.phases["read"] = sum(row["wait"] for row in reads.rows.values())
        result = SweepResult(
            model={"dir": str(self.ckpt.dir), "model_type": cfg.model_type, "n_layers": cfg.n_layers,
                   "name": self.ckpt.dir.resolve().name},
            args=job.args, dense_perplexity=dense_ppl,
            points=[point_row(point, lane, p, job.save_dir) for point, lane, p in zip(job.points, lanes, ppl)],
            eval={"file": str(job.args["eval"]), "windows": job.eval_windows.shape[0],
                  "seqlen": job.eval_windows.shape[1]},
            reads=[reads.rows[b] for b in sorted(reads.rows)], wall_seconds=time.perf_counter() - start,
            peak_rss_bytes=mem.peak_rss, process_peak_rss_bytes=os_peak_rss(), peak_gpu_bytes=mem.peak_gpu,
            plan=job.plan.to_dict(), phases=self.own.phases,
            resumed_at_block=job.first if job.state is not None else None, fingerprint=job.fingerprint)
        result.save(job.out_dir)
        plot(result, job.out_dir / "sweep.png")
        shutil.rmtree(self.work, ignore_errors=True)
        return result

    def streams(self, status: Status) -> tuple[HiddenStream, list[PruneLane]]:
        """The dense evaluation stream and each point's lane, their streams embedded once and copied to every point
        (or, resuming, loaded from the state saved after the last finished block)."""
        job, cfg = self.job, self.ckpt.config
        K, T = job.eval_windows.shape
        N, S = job.windows.shape
        plan = job.plan

        def store(shape: tuple[int, int, int], name: str) -> Any:
            return make_store(shape, plan.placement, job.device, self.work, name)

        def eval_stream(name: str, embed: bool = False) -> HiddenStream:
            scratch = store((K, T, cfg.hidden_size), f"{name}1") if cfg.n_experts else None  # an MoE block's output
            return HiddenStream(self.ckpt, job.eval_windows, job.device, plan.batch,
                                store((K, T, cfg.hidden_size), f"{name}0"), scratch, embed=embed)

        with self.own.timed("embed"):
            dense = eval_stream("eval-dense", embed=job.state is None)
            pos = positions(cfg, S).to(job.device, torch.float32)  # the calibration windows', for every point
            embedded = None  # every point's calibration inputs, embedded once
            if job.state is None and any(j.windows is not None for j in job.jobs):
                embedded = store((N, S, cfg.hidden_size), "calib-embedded")
                embed_windows(self.ckpt, job.windows, job.device, embedded, plan.batch)
            lanes = []
            for i, pj in enumerate(job.jobs):
                calib = None
                if pj.windows is not None:
                    calib = HiddenStream(self.ckpt, job.windows, job.device, plan.batch, store((N, S, cfg.hidden_size),
                                         f"p{i}-calib0"), store((N, S, cfg.hidden_size), f"p{i}-calib1"), embed=False,
                                         pos=pos)
                    if embedded is not None:
                        copy_store(embedded, calib.x, SAVE_BATCH)
                stream = eval_stream(f"p{i}-eval")
                if job.state is None:
                    copy_store(dense.x, stream.x, SAVE_BATCH)
                sink = CheckpointSink(pj.out, pj.out_dir, pj.layout) if job.save_dir else NoSink(self.work, f"p{i}-block")
                report = Report(args=pj.args, model={})
                report.device = job.device
                lanes.append(PruneLane(pj, report, sink, calib, [stream], status, copy=True))
            if embedded is not None:
                embedded.close()
            if job.state is None:
                self.start_checkpoints(lanes)
            else:
                self.load_state(dense, lanes)
        return dense, lanes

    def start_checkpoints(self, lanes: list[PruneLane]) -> None:
        """--save-dir: each point's folder, cleared of a previous sweep's shards, and its first shard (the tensors
        outside the blocks, each read once and written to every point)."""
        if self.job.save_dir is None:
            return
        for lane in lanes:
            lane.job.out_dir.mkdir(parents=True, exist_ok=True)
            for path in lane.job.out_dir.glob("*.safetensors*"):
                path.unlink()
        structures: dict[tuple[str, ...], list[PruneLane]] = {}  # the same tensors outside the blocks, read once
        for lane in lanes:
            structures.setdefault(tuple(lane.job.out.stored_names(None)), []).append(lane)
        for alike in structures.values():
            write_globals(alike[0].job.out, [lane.sink for lane in alike])

    def save_state(self, done: int, dense: HiddenStream, lanes: list[PruneLane], reads: ReadLog) -> None:
        """Every stream after block `done - 1`, into the folder of this block's parity (the other one holds the
        previous state until the journal names this one), then the journal."""
        with self.own.timed("save"):
            folder = self.work / f"state{done % 2}"
            folder.mkdir(exist_ok=True)
            save_store(dense.x, folder / "eval-dense.f32", SAVE_BATCH)
            for i, lane in enumerate(lanes):
                if lane.calib is not None:
                    save_store(lane.calib.x, folder / f"p{i}-calib.f32", SAVE_BATCH)
                save_store(lane.streams[0].x, folder / f"p{i}-eval.f32", SAVE_BATCH)
            state = {"fingerprint": self.job.fingerprint, "blocks_done": done,
                     "points": [{"layers": [asdict(lr) for lr in lane.report.layers], "phases": lane.report.phases,
                                 "experts": lane.report.experts} for lane in lanes],
                     "reads": reads.rows, "phases": self.own.phases}
            with atomic_write(self.work / SWEEP_JOURNAL) as tmp:
                tmp.write_text(json.dumps(state))

    def load_state(self, dense: HiddenStream, lanes: list[PruneLane]) -> None:
        state = self.job.state
        assert state is not None
        done = state["blocks_done"]
        folder = self.work / f"state{done % 2}"
        load_store(dense.x, folder / "eval-dense.f32", SAVE_BATCH)
        for i, (lane, saved) in enumerate(zip(lanes, state["points"])):
            if lane.calib is not None:
                load_store(lane.calib.x, folder / f"p{i}-calib.f32", SAVE_BATCH)
            load_store(lane.streams[0].x, folder / f"p{i}-eval.f32", SAVE_BATCH)
            lane.report.layers = [LayerReport(**lr) for lr in saved["layers"]]
            lane.report.phases.update(saved["phases"])
            lane.report.experts = saved["experts"]
            if isinstance(lane.sink, CheckpointSink):  # --save-dir
                missing = [lane.sink.writer.shard_name(b) for b in range(done + 1)
                           if not (lane.job.out_dir / lane.sink.writer.shard_name(b)).is_file()]
                if missing:
                    raise ArgumentError(f"{lane.job.out_dir}: {missing[0]} of the saved point is gone; rerun with "
                                        "--restart")
        self.own.phases.update(state["phases"])


class SavedState(Consumer):
    """The last consumer of a sweep's blocks: after each block, every stream and the journal saved (see
    `Sweep.save_state`)."""

    def __init__(self, sweep: Sweep, dense: HiddenStream, lanes: list[PruneLane], reads: ReadLog) -> None:
        self.sweep, self.dense, self.lanes, self.reads = sweep, dense, lanes, reads

    def leave(self, block: Part) -> None:
        self.sweep.save_state(block.bid + 1, self.dense, self.lanes, self.reads)


def disk_io(stream: HiddenStream) -> dict[str, int] | None:
    """The bytes read from and written to the calibration activations' files (None: they were in memory)."""
    files = [s for s in (stream.x, stream.scratch) if isinstance(s, DiskActivations)]
    if not files:
        return None
    return {"read_bytes": sum(f.read_bytes for f in files), "written_bytes": sum(f.written_bytes for f in files)}


def mtp_layers(ckpt: Checkpoint, out: Checkpoint) -> dict[str, Any]:
    """The report's record of the checkpoint's multi-token-prediction layers: copied bit for bit, or left out of an
    output that removes routed experts (theirs would no longer fit the model)."""
    if not ckpt.mtp:
        return {}
    if out.mtp:
        return {"mtp_layers": sorted(set(ckpt.mtp.values())), "mtp_tensors": len(ckpt.mtp), "mtp_written": "copied"}
    logger.warning("the multi-token-prediction layer(s) %s keep every routed expert: left out of the output, whose "
                   "config sets %s to 0", sorted(set(ckpt.mtp.values())), ckpt.spec.mtp_key)
    return {"mtp_layers": sorted(set(ckpt.mtp.values())), "mtp_tensors": len(ckpt.mtp), "mtp_written": "left out"}


def perplexity(stream: HiddenStream) -> float:
    total, count = stream.nll()
    return math.exp(total / count)


def point_row(p: Point, lane: PruneLane, ppl: float, save_dir: Path | None) -> dict[str, Any]:
    """A point's line of sweep.json: its seconds are those of its phases (its own pruning and streams)."""
    report = lane.report
    return {"method": p.method, "pattern": p.pattern, "sparsity": p.sparsity, "prune_experts": p.experts,
            "expert_criterion": p.criterion, "compensate_experts": p.compensate, "label": p.label, "perplexity": ppl,
            "total_sparsity": total_sparsity(report.layers), "seconds": sum(report.phases.values()),
            "experts": report.experts,
            "phases": {k: v for k, v in report.phases.items() if v},
            "checkpoint": None if save_dir is None else str(lane.job.out_dir)}

"""The run report: per-layer figures and totals, saved as JSON and shown as a table."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from streamprune.fileio import atomic_write

REPORT_NAME = "streamprune_report.json"
# read: waiting for a block's tensors (what the read-ahead did not hide); replay: rebuilding the inputs of
# a resumed run; calibrate: forward passes up to the sites being pruned; hessian: accumulating X^T X;
# solve: choosing masks and updating weights; error: the reconstruction error of the report;
# forward: the pruned block's outputs for the next block; write: shards and journal.
# eval: the evaluation streams of --eval (the blocks' forwards and the head); sync: with several ranks, summing the
# statistics and receiving the linears other ranks solved (waiting for them included).
# owl: --allocation owl's forward of the dense model over the calibration windows (reads included), before block 0.
PHASES = ("read", "replay", "owl", "calibrate", "hessian", "solve", "error", "forward", "eval", "sync", "write",
          "survey", "compensate")


@dataclass
class Timing:
    seconds: float = 0.0


@dataclass
class LayerReport:
    block: int
    role: str
    name: str
    shape: list[int]
    sparsity: float  # achieved fraction of zeros in the saved weight
    rel_error: float | None  # ||WX - W'X||^2 / ||WX||^2 on the calibration inputs
    seconds: float
    damp: float | None = None  # SparseGPT: damping that made the Cholesky succeed
    damp_retries: int = 0
    iterations: int | None = None  # ADMM: iterations of the mask and weight search
    cg_iterations: int | None = None  # ADMM: conjugate-gradient steps of the final solve of the kept weights
    # ADMM: the largest decrease of a row's objective in that solve's last step, relative to the objective (about
    # what one more step would still gain)
    cg_residual: float | None = None
    expert: int | None = None  # a routed expert's index in its block
    routed_tokens: int | None = None  # calibration tokens the router sent to that expert
    statistics: str | None = None  # whose inputs its solve read: "routed", "all", or "all (fewer than N routed)"
    # With --wbits (and X^T X kept for the errors), with P the weight just before rounding (removed weights 0; for
    # SparseGPT each column as the sweep had updated it when it was rounded) and Q the written one (rel_error):
    sparsity_error: float | None = None  # ||WX - PX||^2 / ||WX||^2
    quant_error: float | None = None  # ||PX - QX||^2 / ||WX||^2
    packed_bytes: int | None = None  # with --wbits: this linear packed (codes, scales, zero points; see quant.py)


@dataclass
class Report:
    args: dict[str, Any]
    model: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    block_phases: dict[str, dict[str, float]] = field(default_factory=dict)  # per block index
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0  # sampled during the run (psutil RSS, file-backed pages included)
    process_peak_rss_bytes: int = 0  # the process's lifetime peak as the OS records it (VmHWM)
    peak_gpu_bytes: int = 0
    total_sparsity: float = 0.0  # zeros over all pruned weights
    read_total_seconds: float = 0.0  # time spent reading blocks, in the read-ahead thread
    read_hidden_seconds: float = 0.0  # the part of it that overlapped with compute
    resumed_at_block: int | None = None
    peak_rss_phase: str = ""  # what the run was doing when the sampled RSS peaked
    memory_profile: dict[str, Any] | None = None  # with --profile-memory: the CSV timeline and its summary
    fingerprint: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)  # torch, device, threads, float32 matmul precision
    environment_changes: list[str] = field(default_factory=list)  # a resumed run's differences from the first one
    quantization: dict[str, Any] | None = None  # with --wbits: the grid and the packed vs dense bytes of the linears
    perplexity: float | None = None  # with --eval: the pruned model's perplexity on its windows
    dense_perplexity: float | None = None  # with --eval-dense: the input model's, on the same windows
    eval: dict[str, Any] | None = None  # with --eval: {file, windows, seqlen, tokens (predicted)}
    # with --eval-tasks: {tasks, num_fewshot, limit, sequences, results (lm-eval's, per task), dense_results}
    tasks: dict[str, Any] | None = None
    block_sparsity: list[float] | None = None  # each block's allocated sparsity (the target everywhere when uniform)
    allocation: dict[str, Any] | None = None  # --allocation owl: its parameters, outlier ratios and block weights
    # --prune-experts: per MoE block, the criterion, the experts kept and removed, and each expert's score, routed
    # calibration tokens, whether it is kept and its index in the output (see `experts.decision`)
    experts: list[dict[str, Any]] | None = None
    expert_scores: dict[str, Any] | None = None  # --expert-scores: the report they came from (file, sha256, criterion)
    # --offload-activations disk: the bytes the calibration activations moved through their files, in all
    # (read_bytes, written_bytes) and per block ("blocks": block index -> read_bytes, written_bytes)
    activation_io: dict[str, Any] | None = None
    world_size: int = 1  # the ranks of the run (processes launched by torchrun)
    # with several ranks: each one's {rank, device, windows, wall_seconds, phases, peak_rss_bytes, peak_gpu_bytes}
    ranks: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.device = torch.device("cpu")  # whose queued work a timing waits for (set by the run; not saved)
        self._open: list[float] = []  # the seconds of the phases timed inside each phase being timed

    def add(self, phase: str, seconds: float, block: int | None = None) -> None:
        self.phases[phase] += seconds
        if block is not None:
            per = self.block_phases.setdefault(str(block), dict.fromkeys(PHASES, 0.0))
            per[phase] += seconds

    @contextlib.contextmanager
    def timed(self, phase: str, block: int | None = None) -> Iterator[Timing]:
        """Count the seconds of the `with` body as `phase` (of `block`), less those of the phases timed inside it;
        on a GPU after its queued work is done, so that the seconds are the work's. The `Timing` it yields holds
        them once the body is done."""
        timing = Timing()
        start = self._clock()
        self._open.append(0.0)
        try:
            yield timing
        finally:
            elapsed = self._clock() - start
            timing.seconds = elapsed - self._open.pop()
            self.add(phase, timing.seconds, block)
            if self._open:
                self._open[-1] += elapsed

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, out_dir: Path) -> Path:
        path = out_dir / REPORT_NAME
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_report(out_dir: Path) -> Report:
    """The report a finished run saved in OUT_DIR."""
    raw = json.loads((out_dir / REPORT_NAME).read_text())
    raw["layers"] = [LayerReport(**lr) for lr in raw["layers"]]
    return Report(**raw)


def total_sparsity(layers: list[LayerReport]) -> float:
    """Zeros over all pruned weights."""
    numel = sum(lr.shape[0] * lr.shape[1] for lr in layers)
    return sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in layers) / numel if numel else 0.0


def quantization_summary(grid: Any, ckpt: Any, layers: list[LayerReport]) -> dict[str, Any]:
    """The grid, and the bytes of the quantized linears packed (`packed_bytes`) against as stored (`dense_bytes`)."""
    layers = [lr for lr in layers if lr.packed_bytes is not None]  # the linears quantized
    packed = sum(lr.packed_bytes or 0 for lr in layers)
    dense = sum(ckpt.info(lr.name).nbytes for lr in layers)
    return {"bits": grid.bits, "group_size": grid.group_size, "sym": grid.sym,
            "weights": sum(lr.shape[0] * lr.shape[1] for lr in layers), "packed_bytes": packed, "dense_bytes": dense,
            "ratio": packed / dense if dense else 0.0}


def summary_table(report: Report):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title=f"streamprune: {report.args['method']} {report.args['pattern']} "
                        f"sparsity {report.args['sparsity']:g}")
    table.add_column("block", justify="right")
    for col in ("layers", "sparsity", "mean rel. error", "max rel. error", "seconds", "slowest phase"):
        table.add_column(col, justify="right")
    blocks = sorted({lr.block for lr in report.layers})
    for b in blocks:
        rows = [lr for lr in report.layers if lr.block == b]
        errs = [lr.rel_error for lr in rows if lr.rel_error is not None]
        numel = sum(lr.shape[0] * lr.shape[1] for lr in rows)
        sparsity = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in rows) / numel
        per = report.block_phases.get(str(b), {})
        total = sum(per.values())
        slowest = max(per, key=per.__getitem__) if per else "-"
        table.add_row(str(b), str(len(rows)), f"{sparsity:.4f}",
                      f"{sum(errs) / len(errs):.4g}" if errs else "-", f"{max(errs):.4g}" if errs else "-",
                      f"{total:.2f}", f"{slowest} {per[slowest] / total:.0%}" if per and total else "-")
    wall = report.wall_seconds or 1.0
    phases = ", ".join(f"{k} {v:.1f}s ({v / wall:.0%})" for k, v in report.phases.items() if v)
    table.caption = (f"total sparsity {report.total_sparsity:.4f}; wall {report.wall_seconds:.1f}s ({phases}); "
                     f"peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB; peak GPU {report.peak_gpu_bytes / 2**20:.0f} MiB")
    if report.allocation is not None:
        table.caption += (f"\nallocation owl (lambda {report.allocation['owl_lambda']:g}, M {report.allocation['owl_m']:g}): "
                          f"block sparsity {min(report.block_sparsity or [0]):.4f} to {max(report.block_sparsity or [0]):.4f}")
    if report.tasks is not None:
        for name, metrics in report.tasks["results"].items():
            dense = (report.tasks["dense_results"] or {}).get(name, {})
            shown = [f"{key.split(',')[0]} {value:.4g}" + (f" (dense {dense[key]:.4g})" if key in dense else "")
                     for key, value in metrics.items() if isinstance(value, float) and "stderr" not in key]
            table.caption += f"\ntask {name}: " + ", ".join(shown)
    if report.experts:
        first = report.experts[0]
        table.caption += (f"\nexperts: {first['kept']} of {len(first['experts'])} kept in each of {len(report.experts)} "
                          f"MoE blocks, by {first['criterion']} (the report's 'experts' lists every score)")
    if report.ranks:
        table.caption += f"\n{report.world_size} ranks: " + ", ".join(
            f"rank {r['rank']} {r['windows']} windows, solve {r['phases']['solve']:.1f}s, sync {r['phases']['sync']:.1f}s"
            for r in report.ranks)
    if report.perplexity is not None and report.eval is not None:
        dense = "" if report.dense_perplexity is None else f" (dense {report.dense_perplexity:.4f})"
        table.caption += (f"\nperplexity {report.perplexity:.4f}{dense} on {report.eval['file']} "
                          f"({report.eval['windows']} windows x {report.eval['seqlen']} tokens)")
    return table

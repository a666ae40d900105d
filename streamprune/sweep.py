"""A sweep's points, its result, and how the result is shown: sweep.json, sweep.csv, the plot and the table.

`streamprune sweep` prunes and evaluates many (method, pattern, sparsity) points in one read of the checkpoint (see
`pipeline.sweep`): each point keeps its own calibration activations and evaluation hidden states, since its model
diverges from the others after the first block; the dense model's evaluation stream goes through each block as read.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from streamprune.errors import ArgumentError
from streamprune.fileio import atomic_write
from streamprune.pruners import Pattern, method, resolve_sparsity

logger = logging.getLogger(__name__)

SWEEP_NAME = "sweep.json"
SWEEP_FILES = (SWEEP_NAME, "sweep.csv", "sweep.png")
SWEEP_JOURNAL = "sweep-journal.json"  # in the work folder, while the sweep runs


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

"""A sweep's points, its result, and how the result is shown: sweep.json, sweep.csv, the plot and the table.

`streamprune sweep` prunes and evaluates many (method, pattern, sparsity) points in one read of the checkpoint (see
`pipeline.sweep`): each point keeps its own calibration activations and evaluation hidden states, since its model
diverges from the others after the first block; the dense model's evaluation stream goes through each block as read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from streamprune.errors import ArgumentError
from streamprune.experts import EXPERT_CRITERIA
from streamprune.fileio import atomic_write
from streamprune.pruners import Pattern, method, resolve_sparsity

logger = logging.getLogger(__name__)

SWEEP_NAME = "sweep.json"
SWEEP_FILES = (SWEEP_NAME, "sweep.csv", "sweep.png")
SWEEP_JOURNAL = "sweep-journal.json"  # in the work folder, while the sweep runs


DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def level(x: float) -> str:
    """A level as a label shows it: two decimals, or every digit where two would round it."""
    text = f"{x:.2f}"
    return text if float(text) == x else repr(x)


@dataclass(frozen=True)
class Point:
    method: str
    pattern: str  # "unstructured" or N:M
    sparsity: float
    experts: float | None = None  # --prune-experts: the fraction of each MoE block's routed experts removed
    criterion: str | None = None  # the score that chooses them
    compensate: bool = False  # --compensate-experts

    @property
    def solves(self) -> bool:
        """Its weights are pruned (else only experts are removed)."""
        return self.sparsity > 0 or self.pattern != "unstructured"

    @property
    def label(self) -> str:
        """A folder-safe name: "sparsegpt-0.50", "sparsegpt-0.125", "wanda-2of4", "experts-0.25-reap",
        "wanda-0.50-experts-0.50-frequency-compensated"."""
        if self.pattern == "unstructured":
            weights = f"{self.method}-{level(self.sparsity)}"
        else:
            weights = f"{self.method}-{self.pattern.replace(':', 'of')}"
        if self.experts is None:
            return weights
        experts = f"experts-{level(self.experts)}-{self.criterion}" + ("-compensated" if self.compensate else "")
        return f"{weights}-{experts}" if self.solves else experts


def as_fractions(given: float | Sequence[float] | None) -> list[float] | None:
    """--prune-experts of a sweep: its fractions (None without it)."""
    return None if given is None else [given] if isinstance(given, (int, float)) else list(given)


def sweep_points(methods: list[str], sparsities: list[float] | None, patterns: list[str],
                 fractions: list[float] | None = None, criteria: list[str] = (), compensate: bool = False
                 ) -> list[Point]:
    """Every method at every unstructured sparsity, then at every N:M pattern; with expert `fractions`, each of
    those at every fraction removed by every criterion (also compensated, with `compensate`), the weights' points
    at sparsity 0 once (the method prunes nothing there). Each is checked as `run` checks it."""
    fractions = list(fractions or [])
    if sparsities is None:
        sparsities = [0.0] if fractions else list(DEFAULT_LEVELS)
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
    if fractions:
        points = expert_points(points, fractions, list(criteria), compensate)
    return points


def expert_points(weights: list[Point], fractions: list[float], criteria: list[str],
                  compensate: bool) -> list[Point]:
    """Each weights' point (those that prune nothing once) at every fraction of experts removed, by every
    criterion, plain then compensated."""
    bad = [c for c in criteria if c not in EXPERT_CRITERIA or c == "random"]
    if not criteria or bad:
        raise ArgumentError(f"sweep: --expert-criteria {','.join(criteria)!r}: each must be one of "
                            f"{', '.join(c for c in EXPERT_CRITERIA if c != 'random')}")
    if len(set(fractions)) != len(fractions) or len(set(criteria)) != len(criteria):
        raise ArgumentError("sweep: a point is given twice (repeated --prune-experts fraction or criterion)")
    once = [p for i, p in enumerate(weights) if p.solves or not any(not q.solves for q in weights[:i])]
    return [dataclasses.replace(p, experts=f, criterion=c, compensate=comp) for p in once for f in fractions
            for c in criteria for comp in ((False, True) if compensate else (False,))]


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
            fields = ["method", "pattern", "sparsity", "total_sparsity", "prune_experts", "expert_criterion",
                      "compensate_experts", "perplexity", "seconds"]
            out = csv.writer(f)
            out.writerow(fields)
            out.writerow(["dense", "", 0.0, 0.0, "", "", "", f"{self.dense_perplexity:.6g}", ""])
            for p in self.points:
                out.writerow([p["method"], p["pattern"], p["sparsity"], f"{p['total_sparsity']:.6f}",
                              "" if p.get("prune_experts") is None else p["prune_experts"],
                              p.get("expert_criterion") or "", "yes" if p.get("compensate_experts") else "",
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
    if any(p.get("prune_experts") is not None for p in result.points):
        plot_experts(result, ax)
        return finish_plot(result, ax, fig, path, "fraction of routed experts removed")
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
    return finish_plot(result, ax, fig, path, "sparsity")


def plot_experts(result: SweepResult, ax: Any) -> None:
    """Perplexity against the fraction of experts removed, one line per criterion (and compensation, and the
    weights' method and level where they are pruned too)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for p in result.points:
        weights = "" if p["sparsity"] == 0 and p["pattern"] == "unstructured" else \
            f"{p['method']} {p['pattern'] if p['pattern'] != 'unstructured' else level(p['sparsity'])}, "
        name = f"{weights}{p['expert_criterion']}" + (" compensated" if p["compensate_experts"] else "")
        lines.setdefault(name, []).append((p["prune_experts"], p["perplexity"]))
    for i, (name, line) in enumerate(lines.items()):
        ax.plot(*zip(*sorted(line)), marker="osv^Dx*"[i % 7], color=f"C{i}", label=name)


def finish_plot(result: SweepResult, ax: Any, fig: Any, path: Path, x: str) -> bool:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ax.axhline(result.dense_perplexity, color="gray", linestyle="--", label=f"dense {result.dense_perplexity:.2f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(x)
    ax.set_ylabel(f"perplexity ({result.eval['windows']} x {result.eval['seqlen']} tokens, log scale)")
    ax.set_title(f"{result.model['name']}: perplexity against {x}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def summary_table(result: SweepResult) -> Table:
    table = Table(title=f"streamprune sweep: {result.model['name']} "
                        f"({result.eval['windows']} windows x {result.eval['seqlen']} tokens)")
    experts = any(p.get("prune_experts") is not None for p in result.points)
    for col in ("method", "pattern", "sparsity", *(("experts removed",) if experts else ()), "perplexity", "change",
                "seconds"):
        table.add_column(col, justify="left" if col in ("method", "pattern", "experts removed") else "right")
    dense = result.dense_perplexity
    table.add_row("dense", "", "0", *(("",) if experts else ()), f"{dense:.4f}", "", "")
    for p in result.points:
        removed = () if not experts else (
            "" if p["prune_experts"] is None else f"{p['prune_experts']:g} {p['expert_criterion']}"
            + (" compensated" if p["compensate_experts"] else ""),)
        table.add_row(p["method"], p["pattern"], f"{p['total_sparsity']:.4f}", *removed, f"{p['perplexity']:.4f}",
                      f"{p['perplexity'] - dense:+.4f}", f"{p['seconds']:.1f}")
    reads = {r["reads"] for r in result.reads}
    table.caption = (f"wall {result.wall_seconds:.1f}s; each of {len(result.reads)} blocks read "
                     f"{'/'.join(map(str, sorted(reads)))} time(s); peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB "
                     f"(planned {result.plan.get('host_peak_bytes', 0) / 2**20:.0f} MiB)")
    return table

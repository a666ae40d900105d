"""The one block loop, and the interface of what it feeds.

`walk` reads the blocks (the next one read ahead) and hands each block, then each of its routed experts one at a
time, then the end of the block, to a list of consumers, in order. A run, a sweep, an evaluation and a replay
differ only in that list:

    eval      [stream]
    run       [reads, dense stream (--eval-dense), pruning lane (its own streams inside)]
    sweep     [reads, dense stream, lane of point 1, ..., lane of point N, saved state]
    replay    [calibration stream, pruned stream]       over the shards a resumed run has written
    OWL       [outlier ratios]                          over the dense model, before block 0

A consumer that changes a block's weights in place (a run's lane) comes after those that need them as read. A
consumer that must see every routed expert of a block before it changes any (one that removes experts by their
scores) asks for a survey: the block's experts are then read twice, the first time handed to `survey`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from streamprune.memory import PeakMemory, release_freed_memory
from streamprune.report import Report
from streamprune.stream import Part


class Consumer:
    """What the block loop feeds; each step does nothing unless the consumer says otherwise."""

    def enter(self, block: Part) -> None:
        """Block `block.bid` as read: its tensors outside the routed experts."""

    def surveys(self, block: Part) -> bool:
        """Whether this consumer must see each routed expert of the block entered before the pass that hands them
        to `expert`."""
        return False

    def survey(self, expert: Part) -> None:
        """One routed expert of the block entered, as read, in the survey pass (when a consumer asked for it)."""

    def surveyed(self, block: Part) -> None:
        """The end of the survey pass: each routed expert of the block was handed to `survey`."""

    def expert(self, expert: Part) -> None:
        """One routed expert of the block entered, as read."""

    def leave(self, block: Part) -> None:
        """The end of the block: each of its routed experts was handed over."""


def walk(blocks: Iterable[Part], consumers: list[Consumer], status: Status | None = None) -> None:
    """Hand every block of `blocks`, then each of its routed experts (twice when a consumer surveys them first),
    then the block's end, to every consumer."""
    for block in blocks:
        for consumer in consumers:
            consumer.enter(block)
        if any(consumer.surveys(block) for consumer in consumers):
            for expert in block.experts():
                for consumer in consumers:
                    consumer.survey(expert)
                del expert
            for consumer in consumers:
                consumer.surveyed(block)
        for expert in block.experts():
            for consumer in consumers:
                consumer.expert(expert)
            del expert  # before the next expert arrives: two experts as stored at most
        for consumer in consumers:
            consumer.leave(block)
        del block  # before the next block arrives: two blocks as stored at most
        release_freed_memory()
        if status is not None:
            status.advance()


class Status:
    """What a pass is doing: a progress bar over blocks and the memory sampler's phase, named together."""

    def __init__(self, bar: Progress, memory: PeakMemory, total: int, done: int, label: str = "") -> None:
        """`label` prefixes the phases the loop names (e.g. "owl: " for a pass before the run's)."""
        self.bar, self.memory, self.done, self.label = bar, memory, done, label
        self.task = bar.add_task(label + "start", total=total, completed=done)

    def also(self, label: str, total: int) -> Status:
        """A second bar for another pass of the same job."""
        return Status(self.bar, self.memory, total, 0, label)

    def phase(self, text: str) -> None:
        self.memory.phase = text
        self.bar.update(self.task, description=text)

    def advance(self) -> None:
        """One more block done; the next one is being read."""
        self.done += 1
        self.bar.advance(self.task)
        self.phase(f"{self.label}block {self.done}: read")


@contextlib.contextmanager
def tracked(memory: PeakMemory, total: int, done: int = 0, progress: bool = True) -> Iterator[Status]:
    """A `Status` over `total` blocks of which `done` are done; the bar shows when `progress`."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
                  TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        yield Status(bar, memory, total, done)


class ReadLog(Consumer):
    """How each block was read: its tensors' bytes, the seconds the read took in the background and the seconds
    the loop waited for it (routed experts counted with their block, in each pass that reads them)."""

    def __init__(self, rows: dict[int, dict[str, Any]] | None = None) -> None:
        self.rows: dict[int, dict[str, Any]] = rows or {}

    def enter(self, block: Part) -> None:
        before = self.rows.get(block.bid, {}).get("reads", 0)
        self.rows[block.bid] = {"block": block.bid, "reads": before + 1, "bytes": 0, "seconds": 0.0, "wait": 0.0,
                                "expert_passes": 0}
        self.expert(block)

    def expert(self, part: Part) -> None:
        row = self.rows[part.bid]
        row["expert_passes"] += part.xid == 0  # each pass over the block's routed experts starts at expert 0
        row["bytes"] += sum(t.nbytes for t in part.raw.values())
        row["seconds"] += part.read_seconds
        row["wait"] += part.wait_seconds

    survey = expert

    def into(self, report: Report) -> None:
        """The waits as each block's "read" phase, the reads' seconds as the run's total."""
        for bid, row in sorted(self.rows.items()):
            report.add("read", row["wait"], bid)
            report.read_total_seconds += row["seconds"]


class Timed(Consumer):
    """A consumer whose every step counts as `phase` of the block in `report`."""

    def __init__(self, consumer: Consumer, report: Report, phase: str) -> None:
        self.consumer, self.report, self.phase = consumer, report, phase

    def enter(self, block: Part) -> None:
        with self.report.timed(self.phase, block.bid):
            self.consumer.enter(block)

    def surveys(self, block: Part) -> bool:
        return self.consumer.surveys(block)

    def survey(self, expert: Part) -> None:
        with self.report.timed(self.phase, expert.bid):
            self.consumer.survey(expert)

    def surveyed(self, block: Part) -> None:
        with self.report.timed(self.phase, block.bid):
            self.consumer.surveyed(block)

    def expert(self, expert: Part) -> None:
        with self.report.timed(self.phase, expert.bid):
            self.consumer.expert(expert)

    def leave(self, block: Part) -> None:
        with self.report.timed(self.phase, block.bid):
            self.consumer.leave(block)

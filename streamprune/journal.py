"""Resumable runs: a fingerprint of the job and a per-block journal kept inside OUT_DIR.

The journal lists each shard once it has been written, flushed, renamed into place and checked.
A rerun of the same job skips those shards; a rerun with a different model, calibration data or
arguments is refused with what differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streamprune.calib import CalibSource
from streamprune.checkpoint import Checkpoint
from streamprune.fileio import atomic_write
from streamprune.memory import device_name
from streamprune.tensorfile import read_header

WORK_DIR = ".streamprune"
JOURNAL_NAME = "journal.json"


def calib_digest(path: Path, windows: Tensor) -> str:
    """Digest of the calibration data as a run uses it: the file's size and the token ids drawn from it. The
    whole file is never read; a change that leaves the drawn windows as they were cannot change the result."""
    h = hashlib.sha256(f"{path.stat().st_size} {tuple(windows.shape)} ".encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def sources_digest(sources: Sequence[CalibSource], windows: Tensor) -> list[dict[str, Any]]:
    """Each calibration source by its file name, its count of windows and the `calib_digest` of its windows (the
    rows of `windows` in the order of `sources`)."""
    parts = windows.split([s.windows for s in sources])
    return [{"file": s.path.name, "windows": s.windows, "digest": calib_digest(s.path, part)}
            for s, part in zip(sources, parts)]


def model_digest(ckpt: Checkpoint) -> str:
    """Digest of config.json and every shard's name, size and header (not the tensor data)."""
    h = hashlib.sha256((ckpt.dir / "config.json").read_bytes())
    for path in sorted({info.path for info in ckpt.tensors.values()}):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(path.name.encode() + path.stat().st_size.to_bytes(8, "little") + f.read(n))
    return h.hexdigest()


def fingerprint(ckpt: Checkpoint, calib: list[dict[str, Any]] | None, args: dict[str, Any]) -> dict[str, Any]:
    """`calib`: the `sources_digest` of the calibration data, if any."""
    return {"model": model_digest(ckpt), "calib": calib, "args": args}


def environment(device: torch.device) -> dict[str, Any]:
    """What besides the inputs and the arguments can change the last bits of a result: the torch build, the
    processor, the thread count (BLAS splits its sums by thread) and the float32 matmul precision (TF32)."""
    return {"torch": torch.__version__, "device": device_name(device), "threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    if old.get("model") != new["model"]:
        diffs.append("the input checkpoint differs")
    if old.get("calib") != new["calib"]:
        diffs.append("the calibration data differs")
    old_args = old.get("args", {})
    for key in sorted(set(old_args) | set(new["args"])):
        if old_args.get(key) != new["args"].get(key):
            diffs.append(f"{key}: {old_args.get(key)!r} before, {new['args'].get(key)!r} now")
    return "; ".join(diffs)


@dataclass
class Journal:
    """What a run has finished: shard index -> its file name, size and the layers' report rows; the
    environment the run started in (see `environment`); and an OWL run's block sparsities."""

    fingerprint: dict[str, Any]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] | None = None  # --allocation owl: the block sparsities, computed once (a resume reuses them)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Journal:
        """A journal as `save` wrote it."""
        return cls(raw["fingerprint"], {int(k): v for k, v in raw.get("done", {}).items()}, raw.get("environment", {}),
                   raw.get("allocation"))

    def save(self, out_dir: Path) -> None:
        (out_dir / WORK_DIR).mkdir(exist_ok=True)
        state = {"fingerprint": self.fingerprint, "done": self.done, "environment": self.environment}
        if self.allocation is not None:
            state["allocation"] = self.allocation
        with atomic_write(out_dir / WORK_DIR / JOURNAL_NAME) as tmp:
            tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")

    def verified(self, out_dir: Path) -> Journal:
        """Keep only the entries whose shard is present with the recorded size and a sound header."""
        kept = {}
        for idx, entry in self.done.items():
            path = out_dir / entry["shard"]
            try:
                ok = path.stat().st_size == entry["bytes"] and set(read_header(path)) == set(entry["tensors"])
            except Exception:  # noqa: BLE001 - any damage means: redo this shard
                ok = False
            if ok:
                kept[idx] = entry
        return Journal(self.fingerprint, kept, self.environment, self.allocation)

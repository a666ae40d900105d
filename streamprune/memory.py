"""Device choice and peak-memory measurement (host RSS as the OS counts it, and CUDA)."""

from __future__ import annotations

import csv
import ctypes
import functools
import platform
import re
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from streamprune.errors import ArgumentError
from streamprune.fileio import atomic_write


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """A memory size such as '24GiB', '20GB', '512MiB' or a plain byte count, in bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].upper() not in UNITS:
        raise ArgumentError(f"memory size {text!r} is not a number with an optional unit (GB, GiB, MB, MiB, ...)")
    value = float(match[1]) * UNITS[match[2].upper()]
    if value <= 0:
        raise ArgumentError(f"memory size {text!r} must be positive")
    return int(value)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ArgumentError(f"device {device!r} requested but no CUDA device is available")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise ArgumentError(f"device {device!r} is not one of auto, cpu, cuda")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model as the OS reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3


def allocate_large_buffers_with_mmap(threshold: int = 1 << 20) -> None:
    """Serve every allocation above `threshold` with its own mapping, returned to the OS when freed.

    glibc otherwise raises this threshold each time a large block is freed, after which blocks of
    that size come from heaps that fragment and seldom shrink: RSS then creeps up block after block
    and spikes unpredictably. Process-wide and permanent (glibc's adaptive threshold cannot be restored), so
    the library never calls it: the command line does, at start; a program that calls `streamprune.prune`
    on a large model and wants the same flat memory calls it once itself.
    """
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and RSS creeps up block by block)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def os_peak_rss() -> int:
    """This process's peak resident set size in bytes as the OS records it (file-backed pages included).

    Linux's VmHWM belongs to the address space, which starts afresh at exec; getrusage's ru_maxrss
    would also carry the parent's RSS at fork time, so it is only the fallback elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


MEMORY_CSV = "streamprune_memory.csv"  # --profile-memory: the samples, in OUT_DIR


class PeakMemory:
    """Samples RSS in a background thread while active; also reads the CUDA allocator's peak.

    The sampler sees peaks reached inside this window even when the process's lifetime peak
    (`os_peak_rss`) predates it, as in a long-lived Python session.
    """

    def __init__(self, device: torch.device, interval: float = 0.05, record: bool = False) -> None:
        self.device = device
        self.interval = interval
        self.record = record
        self.phase = "start"  # set by the caller; recorded with each sample
        self.samples: list[tuple[float, int, int, str]] = []  # (seconds, rss, gpu allocated, phase)
        self.peak_rss = 0
        self.peak_phase = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._proc = psutil.Process()

    def _sample(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            if rss > self.peak_rss:
                self.peak_rss, self.peak_phase = rss, self.phase
            if self.record:
                gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
                self.samples.append((time.perf_counter() - start, rss, gpu, self.phase))
            self._stop.wait(self.interval)

    def write_csv(self, path: Path) -> None:
        with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["seconds", "rss_bytes", "gpu_allocated_bytes", "phase"])
            out.writerows((f"{t:.3f}", rss, gpu, phase) for t, rss, gpu, phase in self.samples)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)

    @property
    def peak_gpu(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0

"""Device choice and peak-memory measurement (host RSS as the OS counts it, and CUDA)."""

from __future__ import annotations

import re
import resource
import threading

import psutil
import torch

from streamprune.errors import ArgumentError


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


def os_peak_rss() -> int:
    """The process's lifetime peak resident set size in bytes (VmHWM, file-backed pages included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Samples RSS in a background thread while active; also reads the CUDA allocator's peak.

    The sampler sees peaks reached inside this window even when the process's lifetime peak
    (`os_peak_rss`) predates it, as in a long-lived Python session.
    """

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

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

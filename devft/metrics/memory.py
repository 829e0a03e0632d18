"""Peak memory of this process while a block of work runs (resident set size, plus CUDA when used)."""

from __future__ import annotations

import os
import resource
import threading
import time
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; falls back to the lifetime peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return lifetime_peak_rss_mb()


def lifetime_peak_rss_mb() -> float:
    """Peak resident set size over the whole life of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Context manager sampling RSS every ``interval`` s in a thread; ``peak_rss_mb`` after exit.

    The lifetime peak (``ru_maxrss``) is useless for per-round numbers in a long-lived worker, hence the
    sampler. On CUDA the peak allocated device memory of the block is recorded as ``peak_cuda_mb``.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss_mb = 0.0
        self.peak_cuda_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self.peak_rss_mb = current_rss_mb()
        if _cuda_in_use():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, current_rss_mb())
            time.sleep(self.interval)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, current_rss_mb())
        if _cuda_in_use():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def _cuda_in_use() -> bool:
    """Whether this process already uses CUDA: asking a process that trains on the CPU for CUDA statistics
    would create a CUDA context in it (hundreds of MiB of host memory), inflating the RSS it measures."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()

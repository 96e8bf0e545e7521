"""Peak memory of a piece of work, on CUDA or on the CPU (the harness's memory half).

CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats()` (bytes held by
tensors; the caching allocator's reserve is not counted).
CPU: the process's resident set size, sampled every millisecond by a thread while the work
runs (`/proc/self/statm`); the peak is process-wide (Python, torch and the model included), and
memory the C allocator keeps after a free still counts, which is why callers measure each model
in a fresh process.
"""
from __future__ import annotations

import os
import threading
import time

import torch

from .timing import sync

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:                     # not Linux: the lifetime peak is the best we have
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(device) as m: work()`` then ``m.peak`` (bytes) and ``m.seconds`` (the
    interval, synchronised at both ends; on the CPU the sampling thread slows Python-heavy work,
    so time with `experiments.timing` where the time matters)."""

    def __init__(self, device: torch.device | str, interval_s: float = 1e-3):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak = 0
        self.seconds = 0.0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error from CUDA or from the host allocator."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                              or "can't allocate memory" in str(exc).lower())


def free_memory(device: torch.device | str) -> None:
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def cuda_kernel_profile(step, steps: int = 3, top: int = 15) -> list[dict]:
    """CUDA time per kernel over ``steps`` calls of ``step(i)`` (torch.profiler, after one
    untraced warm-up call): the ``top`` kernels by total time, [{"name", "calls", "us_total"}],
    per call. Only kernel time: launch gaps are not in these numbers. [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    from torch.profiler import ProfilerActivity, profile
    step(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i + 1)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:120], "calls": e.count // steps, "us_total": t / steps})
    rows.sort(key=lambda r: -r["us_total"])
    return rows[:top]

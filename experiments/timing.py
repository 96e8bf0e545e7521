"""How every experiment times its work: one policy, one function, one result type.

``time_call(fn, device)`` times a callable that can be repeated:

* CUDA: the per-call times of `triton.testing.do_bench` (its L2 flush between calls, CUDA
  events, ``warmup_ms`` of untimed calls, then ``rep_ms`` of timed ones; a call so slow that
  this holds fewer than ``min_reps`` of them is timed again for ``min_reps`` calls);
* CPU: ``warmup`` untimed calls, then calls timed one by one with the wall clock until there
  are at least ``min_reps`` and ``budget_s`` has passed (at most ``max_reps``).

Either way the result is a `Timing`: the median and the spread of the per-call times in ms.
A ``stepwise`` policy times every call with the wall clock and a device sync, also on CUDA, and
never makes more than ``warmup + max_reps`` calls: for steps that advance a state (decoding),
where the caller must size the state for the calls it allows.

``Stopwatch(device)`` measures one interval (synchronised at both ends) for work that runs
once: a whole training step in a loop, a stream of a million tokens.

``torch_threads(n)``: torch's intra-op threads for a block. The CPU presets run one thread:
tiny models gain little from more, and on a machine whose cores are busy with other work the
threads' barriers cost far more than the work (a tenfold slowdown of a training step was seen
on two shared cores), which is also what made CPU timings jump between runs.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimingPolicy:
    """How many calls `time_call` makes. ``warmup_ms`` and ``rep_ms`` are do_bench's (CUDA);
    ``warmup``, ``budget_s`` and ``max_reps`` the wall-clock loop's (the CPU's, and a stepwise
    policy's on any device); ``min_reps`` holds for both."""
    warmup_ms: float = 25.0         # CUDA: untimed calls for this long
    rep_ms: float = 100.0           # CUDA: timed calls for this long
    warmup: int = 1                 # wall clock: untimed calls
    min_reps: int = 5               # wall clock: at least this many timed calls ...
    budget_s: float = 0.1           # ... and until this long has passed ...
    max_reps: int = 10_000          # ... but never more than this many
    stepwise: bool = False          # wall clock and a sync per call on CUDA too

    def __post_init__(self):
        for name in ("warmup", "min_reps", "max_reps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {getattr(self, name)!r}")
        if self.min_reps < 1 or self.max_reps < self.min_reps:
            raise ValueError(f"min_reps, max_reps: expected 1 <= min_reps <= max_reps, got "
                             f"{self.min_reps}, {self.max_reps}")
        if not self.budget_s >= 0 or not self.warmup_ms >= 0 or not self.rep_ms > 0:
            raise ValueError(f"budget_s, warmup_ms, rep_ms: expected >= 0, >= 0, > 0, got "
                             f"{self.budget_s}, {self.warmup_ms}, {self.rep_ms}")

    def with_min_reps(self, reps: int | None) -> "TimingPolicy":
        """This policy with at least ``reps`` timed calls (None: unchanged)."""
        if reps is None:
            return self
        return dataclasses.replace(self, min_reps=reps, max_reps=max(self.max_reps, reps))


POLICY = TimingPolicy()
# Decoding: dependent steps that advance a state, timed one by one; at most 64 of them, so a
# position table or a static cache needs ``warmup + 64`` slots beyond the context.
DECODE_POLICY = TimingPolicy(warmup=2, min_reps=16, budget_s=0.25, max_reps=64, stepwise=True)


@dataclass(frozen=True)
class Timing:
    """Per-call times of one measurement, in ms: the median and the spread."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    reps: int
    method: str                     # "do_bench", "do_bench_cudagraph" or "wall clock"

    @classmethod
    def of(cls, times_ms: list[float], method: str) -> "Timing":
        ts = sorted(times_ms)
        q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else ts * 4
        return cls(statistics.median(ts), q[0], q[3], ts[0], ts[-1], len(ts), method)

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how much the middle of the distribution moves."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, *, policy: TimingPolicy = POLICY, grad_to_none=None,
              cuda_graph: bool = False) -> Timing:
    """The per-call times of ``fn()`` on ``device`` under ``policy`` (see the module's
    docstring). ``grad_to_none``: tensors whose .grad is reset before every call, so a
    backward does not accumulate into them. ``cuda_graph`` (CUDA): ``fn`` captured once in a
    CUDA graph and replayed (`triton.testing.do_bench_cudagraph`, for ``rep_ms``): the GPU
    time without the host's launch overhead."""
    device = torch.device(device)
    if device.type == "cuda" and not policy.stepwise:
        return _do_bench(fn, policy, grad_to_none, cuda_graph)
    return Timing.of(_wall_clock(fn, device, policy, grad_to_none), "wall clock")


def _do_bench(fn, policy: TimingPolicy, grad_to_none, cuda_graph: bool) -> Timing:
    from triton.testing import do_bench, do_bench_cudagraph
    grads = list(grad_to_none) if grad_to_none else None
    if cuda_graph:
        times = do_bench_cudagraph(fn, rep=policy.rep_ms, grad_to_none=grads,
                                   return_mode="all")
        return Timing.of(list(times), "do_bench_cudagraph")
    times = do_bench(fn, warmup=policy.warmup_ms, rep=policy.rep_ms, grad_to_none=grads,
                     return_mode="all")
    if len(times) < policy.min_reps:
        # A call slower than rep_ms gets a single timed run from do_bench: time again for
        # long enough to hold min_reps of them.
        rep = 1.2 * policy.min_reps * statistics.median(times)
        times = do_bench(fn, warmup=0, rep=rep, grad_to_none=grads, return_mode="all")
    return Timing.of(list(times), "do_bench")


def _wall_clock(fn, device, policy: TimingPolicy, grad_to_none) -> list[float]:
    def clear():
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(policy.warmup):
        clear()
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < policy.max_reps and (
            len(times) < policy.min_reps or time.perf_counter() - start < policy.budget_s):
        clear()
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


class Stopwatch:
    """``with Stopwatch(device) as sw: work()`` then ``sw.seconds``: one interval, the device
    synchronised at both ends."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


@contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (None: left as they are)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

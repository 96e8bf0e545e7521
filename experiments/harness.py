"""The one experiment harness: every experiment times, measures memory, compares, writes its
results and builds its command line through the names here.

* timing (`experiments.timing`): `time_call` under one `TimingPolicy`, `Timing`, `Stopwatch`,
  `torch_threads`;
* memory (`experiments.measure`): `PeakMemory`, `is_oom`, `free_memory`, `rss_bytes`,
  `cuda_kernel_profile`;
* comparison: `rel_err`, `loglog_slope`;
* a model's training step to time: `train_step`;
* results (`experiments.results`): run metadata, atomic JSON / text / figure / torch files,
  Markdown tables;
* command lines (`experiments.cli`): a config dataclass's ArgumentParser and `validate`.
"""
from __future__ import annotations

import math

import torch

from .cli import (Choice, Device, Flag, Float, InDir, InFile, Int, Ints, KeyValues, Names,
                  Optional, OutDir, Text, build_parser, fail, option, parse_config,
                  threads_field, validate)
from .measure import PeakMemory, cuda_kernel_profile, free_memory, is_oom, rss_bytes
from .results import (commit_label, default_out, load_torch, markdown_table, run_meta,
                      save_figure, save_torch, write_json, write_text)
from .timing import (DECODE_POLICY, POLICY, Stopwatch, Timing, TimingPolicy, sync, time_call,
                     torch_threads)


def train_step(forward, optimizer, x, y, autocast):
    """The step the training benchmarks time: forward with targets under ``autocast`` (a
    context manager), backward, optimizer step, gradients freed."""
    def step():
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖, in float64 on the CPU."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x) over the points with x > 0 and y > 0: the
    power of a power law. None with fewer than two distinct x; exactly 0.0 when every y is
    the same (a fixed size)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    if len({p[1] for p in pts}) == 1:
        return 0.0
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


__all__ = ["Choice", "Device", "Flag", "Float", "InDir", "InFile", "Int", "Ints", "KeyValues",
           "Names", "Optional", "OutDir", "Text", "build_parser", "fail", "option",
           "parse_config", "threads_field", "validate",
           "PeakMemory", "cuda_kernel_profile", "free_memory", "is_oom", "rss_bytes",
           "commit_label", "default_out", "load_torch", "markdown_table", "run_meta",
           "save_figure", "save_torch", "write_json", "write_text", "DECODE_POLICY", "POLICY",
           "Stopwatch", "Timing", "TimingPolicy", "sync", "time_call", "torch_threads",
           "rel_err", "loglog_slope", "train_step"]

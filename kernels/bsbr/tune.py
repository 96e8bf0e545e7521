"""Launch sweeps of the BSBR Triton kernels: time candidate launches on random inputs of one
shape class and store the fastest in the per-GPU tuning cache (`kernels.launch.store_tuned`),
where every later call with ``launch=None`` at that shape class finds it.

    shape = SweepShape(T=32768, heads=16, head_dim=128, chunk_size=256, top_k=8)
    tune_routing(shape, "cuda")       # the top-k routing forward
    tune_readout(shape, "cuda")       # bsbr fwd+bwd per readout launch, at the routing stored

Times are medians of `triton.testing.do_bench` on CUDA. On the CPU (the Triton interpreter,
for tests) they are wall-clock medians and mean nothing; nothing is stored for a device
without a GPU model name (`kernels.launch.device_name`).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch

from .. import launch as tuning_cache
from .api import bsbr_attention, chunk_states
from .launch import STAGES, BSBRLaunch, ReadoutLaunch, RoutingLaunch, shape_classes

# The routing sweep. The first launch (float32 FMAs) is the reference of "same_slots", the
# share of its selections a launch reproduces: the pick is the fastest launch that agrees on
# all but near-ties (SAME_SLOTS_MIN; tf32x3 differed in 3 per million picks at 32k).
ROUTE_CANDIDATES = tuple(
    RoutingLaunch(block_q=bq, block_s=bs, warps=w, precision=p)
    for bq, bs, w, p in ((32, 32, 4, "ieee"), (64, 32, 4, "ieee"), (64, 64, 8, "ieee"),
                         (32, 32, 4, "tf32x3"), (64, 32, 4, "tf32x3"), (64, 64, 8, "tf32x3"),
                         (128, 32, 8, "tf32x3")))
SAME_SLOTS_MIN = 0.9999

# The readout sweep: entries per program, warps and forward V tile (whole-V tiles save the
# re-gathers of q per V slice), then at 64 / 4 / 64 the two-pass backward with the default dF
# launch and with 32-entry dots on 64-wide V slices, and the one-pass backward on 32-entry
# blocks (the default is 64).
_GROUPED = ((32, 4, 64), (64, 4, 64), (64, 8, 64), (128, 8, 64), (64, 4, 128), (64, 8, 128),
            (128, 8, 128))
READOUT_CANDIDATES = (
    *(ReadoutLaunch(block=be, warps=w, block_v=bv) for be, w, bv in _GROUPED),
    ReadoutLaunch(block=64, warps=4, block_v=64, backward="two_pass"),
    ReadoutLaunch(block=64, warps=4, block_v=64, backward="two_pass", df_block=32,
                  df_block_v=64, df_warps=4),
    ReadoutLaunch(block=64, warps=4, block_v=64, fused_block=32))


@dataclass(frozen=True)
class SweepShape:
    """The sizes of a sweep's random inputs [batch, heads, T, ·]; meta_dim None = head_dim."""
    T: int = 32768
    batch: int = 1
    heads: int = 16
    head_dim: int = 128
    chunk_size: int = 256
    top_k: int | None = 8
    dtype: torch.dtype = torch.bfloat16
    meta_dim: int | None = None

    @property
    def M(self) -> int:
        return self.head_dim if self.meta_dim is None else self.meta_dim

    def classes(self) -> dict[str, str]:
        return shape_classes(dtype=self.dtype, T=self.T, K=self.head_dim, V=self.head_dim,
                             M=self.M, chunk_size=self.chunk_size, top_k=self.top_k)

    def inputs(self, device, seed: int = 0) -> list[torch.Tensor]:
        """q, k, v, r, hk: random rows of norm ~1 (sane chunk states and softmax)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        dims = (self.head_dim,) * 3 + (self.M, self.M)
        return [(torch.randn(self.batch, self.heads, self.T, d, generator=g) / math.sqrt(d))
                .to(device, self.dtype) for d in dims]


def time_ms(fn, device) -> float:
    """Median ms of fn(): do_bench on CUDA, the wall clock of 3 runs after a warm-up else."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _sweep(candidates, run, device, stage: str, shape: SweepShape, key: str, ok=None) -> dict:
    """Each candidate's row ({fields, key: ms, "note"}); the fastest row that ``ok`` accepts is
    stored for ``stage`` at the shape's class. A candidate that fails is a row with a note."""
    rows = []
    for launch in candidates:
        row = {**dataclasses.asdict(launch), key: None, "note": None}
        try:
            row.update(run(launch))
        except Exception as exc:                    # noqa: BLE001 (a row, not a crash)
            first = (str(exc).splitlines() or [""])[0][:200]
            row["note"] = f"failed: {type(exc).__name__}: {first}"
        rows.append((launch, row))
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    good = [(lc, r) for lc, r in rows if r[key] is not None and (ok is None or ok(r))]
    best = min(good, key=lambda lr: lr[1][key])[0] if good else None
    cls = shape.classes()[stage]
    path = None
    if best is not None and tuning_cache.device_name(device) is not None:
        path = tuning_cache.store_tuned(STAGES[stage][0], device, cls, dataclasses.asdict(best))
    return {"shape_class": cls, "rows": [r for _, r in rows], "best": best, "path": path}


def tune_routing(shape: SweepShape, device, candidates=ROUTE_CANDIDATES) -> dict:
    """Time the top-k routing forward for each candidate on the meta keys bsbr_attention would
    route to; store the fastest that picks the first candidate's slots (but for near-ties).
    Returns {"shape_class", "rows" (with "fwd_ms", "same_slots"), "best", "path"}."""
    from .routing_triton import SelectedScoresTriton
    _, k, v, r, hk = shape.inputs(device)
    _, h = chunk_states(k, v, hk, chunk_size=shape.chunk_size)
    kk = h.shape[2] if shape.top_k is None else min(shape.top_k, h.shape[2])
    first = []

    def run(launch):
        def call():
            return SelectedScoresTriton.apply(r, h, 0, 0, shape.chunk_size, kk, None, launch)
        idx = call()[0]
        if not first:
            first.append(idx)
        return {"same_slots": float((idx == first[0]).float().mean()),
                "fwd_ms": time_ms(call, device)}
    return _sweep(candidates, run, device, "routing", shape, "fwd_ms",
                  ok=lambda row: row["same_slots"] >= SAME_SLOTS_MIN)


def tune_readout(shape: SweepShape, device, candidates=READOUT_CANDIDATES,
                 routing: RoutingLaunch | None = None) -> dict:
    """Time bsbr_attention forward + backward for each readout candidate (the routing as given,
    else as the cache has it: run tune_routing first); store the fastest. Returns
    {"shape_class", "rows" (with "fwd_bwd_ms"), "best", "path"}."""
    leaves = [t.requires_grad_(True) for t in shape.inputs(device)]
    do = torch.randn_like(leaves[2])

    def run(launch):
        bsbr = BSBRLaunch(routing=routing, readout=launch)

        def call():
            o = bsbr_attention(*leaves, chunk_size=shape.chunk_size, top_k=shape.top_k,
                               launch=bsbr, backend="triton")
            torch.autograd.grad(o, leaves, do)
        return {"fwd_bwd_ms": time_ms(call, device)}
    return _sweep(candidates, run, device, "readout", shape, "fwd_bwd_ms")

"""How one call runs: the forward algorithm (split or fused), the chunk sizes of the forward and
the backward, and the tile sizes of every kernel. A `Plan` is chosen once per call from the
shape (`plan`) and passed down to the launchers; nothing here is mutable module state.

The forward's algorithm: "split" (fwd_h writes every chunk's state, fwd_o reads them), "fused"
(the fused kernel: no per-chunk states in memory) or "auto" (the rule in `plan`). The
environment variable GLASSBRAIN_FWD_MODE overrides "auto" for a whole process (benchmarks
compare the two end to end); benchmarks that sweep tiles build `Plan`s themselves.

Determinism: the fused forward sums the K tiles' shares of O with float32 atomics whenever K
spans more than one tile, so its last bits depend on the order the programs run in. Under
`torch.use_deterministic_algorithms(True)` the plan takes the split forward instead (every
output element is then written by one program, in a fixed order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

from .common import INTERPRET, _tile

FWD_MODES = ("auto", "split", "fused")
FUSED_MIN_PROGRAMS = 256      # ~2 per SM on an H100: fewer and the fused forward idles SMs


@dataclass(frozen=True)
class Tiles:
    """The tile sizes of one pass (forward or backward) at chunk BT."""
    BT: int
    h_BK: int          # state kernels: one [BK, BV] float32 tile per program
    h_BV: int
    o_BK: int          # output / dv kernels: [BT, BV] accumulator + [BT, BT] scores, loop over K
    o_BV: int
    dqk_BK: int        # dq/dk kernel: two [BT, BK] accumulators, loop over V
    dqk_BV: int
    fused_BK: int      # fused forward: one [BK, BV] float32 state slice per program
    fused_BV: int
    fused_warps: int | None = None      # None: by the tile size


def make_tiles(K: int, V: int, BT: int, overrides: dict | None = None) -> Tiles:
    """Default tiles for K, V at chunk BT; ``overrides`` pins some ({"o_BV": 64, ...})."""
    big = not INTERPRET
    t = dict(
        h_BK=_tile(K, 128 if big else 64), h_BV=_tile(V, 64),
        o_BK=_tile(K, 64), o_BV=_tile(V, (128 if BT <= 64 else 64) if big else 64),
        dqk_BK=_tile(K, 64), dqk_BV=_tile(V, 64),
        # 32 KiB at 128×64, the sweep's best: 128×128 spills registers, 64×64 doubles atomics.
        fused_BK=_tile(K, 128 if big else 32), fused_BV=_tile(V, 64 if big else 32))
    warps = None
    for name, value in (overrides or {}).items():
        if name == "fused_warps":
            warps = value
        elif name in t:
            t[name] = _tile({"K": K, "V": V}[name[-1]], value)
        else:
            raise ValueError(f"tile override: unknown name {name!r}; expected one of "
                             f"{sorted(t) + ['fused_warps']}")
    return Tiles(BT=BT, fused_warps=warps, **t)


@dataclass(frozen=True)
class Plan:
    """fused: the fused forward; BT / BT_bwd: the forward / backward chunk sizes;
    overrides: pinned tile sizes (benchmarks)."""
    fused: bool
    BT: int
    BT_bwd: int
    overrides: dict = field(default_factory=dict)

    def fwd_tiles(self, K: int, V: int) -> Tiles:
        return make_tiles(K, V, self.BT, self.overrides)

    def bwd_tiles(self, K: int, V: int) -> Tiles:
        return make_tiles(K, V, self.BT_bwd, self.overrides)


def fused_needs_atomics(K: int, tiles: Tiles) -> bool:
    """The fused forward sums O over K tiles with atomics unless one tile covers K."""
    return triton.cdiv(K, tiles.fused_BK) > 1


def fwd_mode() -> str:
    mode = os.environ.get("GLASSBRAIN_FWD_MODE", "auto")
    if mode not in FWD_MODES:
        raise ValueError(f"GLASSBRAIN_FWD_MODE: expected one of {FWD_MODES}, got {mode!r}")
    return mode


def plan(B: int, H: int, K: int, V: int, chunk_size: int | None = None,
         mode: str | None = None) -> Plan:
    """The plan for a call; an explicit chunk_size fixes both chunks. The rule follows the H100
    sweep (BENCHMARKS.md, bench_kernels --sweep):
      * fused forward (128×64 state slices, chunk 64) where it won: wide keys, whose float32
        output buffer is small next to Q and K (BDH: K = 32·V; 0.73 vs 0.91 ms split), and
        K ≤ 128, where no atomics are needed, given ≥ FUSED_MIN_PROGRAMS programs (B8 H16
        K=V=128: 0.216 vs 0.431 ms); otherwise the split forward at chunk 128 (B4 H8 K=V=256:
        0.316 vs 0.345 fused; B2 H16 T16k K=V=128, 64 programs: 0.491 vs 0.508);
      * backward chunk 128 where K·V is large or the state kernels have few programs (BDH
        2.54 vs 3.04 ms; K=V=256 0.87 vs 0.96; B2 H16 1.54 vs 1.60), else 64 (B8 H16 K=V=128:
        1.36 vs 1.43);
      * the split forward whenever deterministic algorithms are requested and the fused one
        would need atomics."""
    mode = mode or fwd_mode()
    if mode not in FWD_MODES:
        raise ValueError(f"mode: expected one of {FWD_MODES}, got {mode!r}")
    state_programs = B * H * triton.cdiv(K, 128) * triton.cdiv(V, 64)
    if INTERPRET:                       # tests choose their paths explicitly; keep chunk 64
        fused = mode == "fused"
    elif mode != "auto":
        fused = mode == "fused"
    elif K > 128:
        fused = K >= 8 * V
    else:
        fused = state_programs >= FUSED_MIN_PROGRAMS
    if fused and torch.are_deterministic_algorithms_enabled():
        fused = not fused_needs_atomics(K, make_tiles(K, V, chunk_size or 64))
    if chunk_size:
        return Plan(fused, chunk_size, chunk_size)
    if INTERPRET:
        return Plan(fused, 64, 64)
    bwd = 128 if (K * V >= 256 * 256 or state_programs < FUSED_MIN_PROGRAMS) else 64
    return Plan(fused, 64 if fused else 128, bwd)

"""How one call runs: the forward algorithm (split or fused), the chunk sizes of the forward and
the backward, and the tile sizes of every kernel. A `Plan` is chosen once per call from the
shape and the call's `ChunkLaunch` (`plan`) and passed down to the launchers.

The forward's algorithm is the launch's mode: "split" (fwd_h writes every chunk's state, fwd_o
reads them), "fused" (the fused kernel: no per-chunk states in memory) or "auto" (the rule in
`plan`). The environment variable GLASSBRAIN_FWD_MODE sets the mode of the default launch (calls
that pass none), so an end-to-end benchmark can compare the two through a whole model; an
explicit launch is taken as given.

Determinism: the fused forward sums the K tiles' shares of O with float32 atomics whenever K
spans more than one tile, so its last bits depend on the order the programs run in. Under
`torch.use_deterministic_algorithms(True)` the plan takes the split forward instead (every
output element is then written by one program, in a fixed order).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from ..launch import length_bucket, pow2_tile
from .launches import FWD_MODES, ChunkLaunch, default_launch

FUSED_MIN_PROGRAMS = 256      # ~2 per SM on an H100: fewer and the fused forward idles SMs


@dataclass(frozen=True)
class Tiles:
    """The tile sizes of one pass (forward or backward) at chunk BT, resolved for K and V."""
    BT: int
    h_BK: int
    h_BV: int
    o_BK: int
    o_BV: int
    dqk_BK: int
    dqk_BV: int
    dA_BV: int
    fused_BK: int
    fused_BV: int
    fused_warps: int          # 0: by the tile size


def make_tiles(K: int, V: int, BT: int, launch: ChunkLaunch) -> Tiles:
    """The tiles of ``launch`` for K, V at chunk BT."""
    return Tiles(
        BT=BT, h_BK=pow2_tile(K, launch.h_BK), h_BV=pow2_tile(V, launch.h_BV),
        o_BK=pow2_tile(K, launch.o_BK),
        o_BV=pow2_tile(V, launch.o_BV or (128 if BT <= 64 else 64)),
        dqk_BK=pow2_tile(K, launch.dqk_BK), dqk_BV=pow2_tile(V, launch.dqk_BV),
        dA_BV=pow2_tile(V, launch.dA_BV),
        fused_BK=pow2_tile(K, launch.fused_BK), fused_BV=pow2_tile(V, launch.fused_BV),
        fused_warps=launch.fused_warps)


@dataclass(frozen=True)
class Plan:
    """fused: the fused forward; BT / BT_bwd: the forward / backward chunk sizes; launch: the
    tiles."""
    fused: bool
    BT: int
    BT_bwd: int
    launch: ChunkLaunch = ChunkLaunch()

    def fwd_tiles(self, K: int, V: int) -> Tiles:
        return make_tiles(K, V, self.BT, self.launch)

    def bwd_tiles(self, K: int, V: int) -> Tiles:
        return make_tiles(K, V, self.BT_bwd, self.launch)


def fused_needs_atomics(K: int, tiles: Tiles) -> bool:
    """The fused forward sums O over K tiles with atomics unless one tile covers K."""
    return triton.cdiv(K, tiles.fused_BK) > 1


def fwd_mode() -> str:
    mode = os.environ.get("GLASSBRAIN_FWD_MODE", "auto")
    if mode not in FWD_MODES:
        raise ValueError(f"GLASSBRAIN_FWD_MODE: expected one of {FWD_MODES}, got {mode!r}")
    return mode


def default_chunk_launch(B: int, H: int, K: int, V: int, dtype: torch.dtype,
                         device) -> ChunkLaunch:
    """The launch of a call that passes none (`launches.default_launch`), its mode set by
    GLASSBRAIN_FWD_MODE when that is "split" or "fused"."""
    launch = default_launch(ChunkLaunch, "hebbian_chunk", device, K=K, V=V,
                            BH=length_bucket(B * H), dtype=dtype)
    mode = fwd_mode()
    return launch if mode == "auto" else dataclasses.replace(launch, mode=mode)


def plan(B: int, H: int, K: int, V: int, launch: ChunkLaunch,
         chunk_size: int | None = None) -> Plan:
    """The plan for a call; an explicit chunk_size fixes both chunks, else the launch's BT and
    BT_bwd, else the rule. The rule follows the H100 sweep (BENCHMARKS.md, bench_kernels
    --sweep):
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
    state_programs = B * H * triton.cdiv(K, 128) * triton.cdiv(V, 64)
    if launch.mode != "auto":
        fused = launch.mode == "fused"
    elif K > 128:
        fused = K >= 8 * V
    else:
        fused = state_programs >= FUSED_MIN_PROGRAMS
    if fused and torch.are_deterministic_algorithms_enabled():
        fused = not fused_needs_atomics(K, make_tiles(K, V, chunk_size or 64, launch))
    if chunk_size:
        return Plan(fused, chunk_size, chunk_size, launch)
    bwd = 128 if (K * V >= 256 * 256 or state_programs < FUSED_MIN_PROGRAMS) else 64
    return Plan(fused, launch.BT or (64 if fused else 128), launch.BT_bwd or bwd, launch)

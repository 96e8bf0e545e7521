"""The launch settings of the Hebbian kernels: one frozen dataclass per op, passed per call
(`launch=`), so no module holds tile choices that a benchmark or test would have to mutate.

Tile fields (BK, BV, h_BK, ...) are caps: a kernel's tile is the field, or the dimension rounded
up to a power of two when that is smaller (`kernels.launch.pow2_tile`), never below 16 (tl.dot's
minimum); the chunk sizes BT and BT_bwd are taken as they are. A field documented with "0:"
takes the rule named there when it is 0.

A call that passes no launch gets `default_launch`: the dataclass defaults (the GPU tiles) with
the per-GPU tuning cache's entry for the call's shape class applied (`kernels.launch.with_tuned`;
the CPU has no cache). Under the Triton interpreter the default is the smaller
`INTERPRETER_DEFAULTS` tiles instead: the interpreter runs every program in Python, and small
tiles keep the CPU tests fast. The GPU tiles stay reachable there by passing the dataclass
defaults explicitly (`launch=StepLaunch()`), which is how the CPU tests cover them.

This module imports neither Triton nor `kernels.launch` at import time (importing `kernels`
must not load Triton); `default_launch` does, when a kernel is about to run.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType

from .validate import MAX_CHUNK

FWD_MODES = ("auto", "split", "fused")
WARPS = (1, 2, 4, 8, 16, 32)


def _tile(default: int, *, lo: int = 16, hi: int | None = None, auto: bool = False):
    return field(default=default, metadata={"kind": "tile", "lo": lo, "hi": hi, "auto": auto})


def _warps(default: int, *, auto: bool = False):
    return field(default=default, metadata={"kind": "warps", "auto": auto})


def _count(default: int):
    return field(default=default, metadata={"kind": "count", "auto": True})


class _Checked:
    """Checks the int fields at construction: a bad launch fails before any kernel runs."""

    def __post_init__(self):
        for f in fields(self):
            kind, value = f.metadata.get("kind"), getattr(self, f.name)
            if kind is None:
                continue
            where = f"{type(self).__name__}.{f.name}"
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{where}: expected an int, got {type(value).__name__}")
            if f.metadata["auto"] and value == 0:
                continue
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            if kind == "count":
                ok, expected = value > 0, "an int >= 0 (0: the rule)"
            elif kind == "warps":
                ok, expected = value in WARPS, f"one of {WARPS}"
            else:
                ok = value >= lo and (hi is None or value <= hi) and value & (value - 1) == 0
                expected = f"a power of two in [{lo}, {hi}]" if hi else f"a power of two >= {lo}"
            if not ok:
                if f.metadata["auto"] and kind != "count":
                    expected += " or 0 (the rule)"
                raise ValueError(f"{where}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class ChunkLaunch(_Checked):
    """The chunked forward and backward (`hebbian_attention`, backend "triton").

    mode: the forward algorithm, "split" (the state kernel writes every chunk's state, the
    output kernel reads them), "fused" (no chunk states in memory) or "auto" (`plan.plan`'s
    rule). Deterministic algorithms override "fused" when it would need atomics. BT / BT_bwd:
    the forward / backward chunk (a call's chunk_size, when given, sets both). The rest are the
    tiles of each kernel (chunk_state.py, chunk_output.py, chunk_grad.py)."""
    mode: str = "auto"
    BT: int = _tile(0, hi=MAX_CHUNK, auto=True)          # 0: 64 fused, 128 split
    BT_bwd: int = _tile(0, hi=MAX_CHUNK, auto=True)      # 0: plan.plan's rule
    h_BK: int = _tile(128)       # state kernels: one [BK, BV] float32 tile per program
    h_BV: int = _tile(64)
    o_BK: int = _tile(64)        # output / dv kernels: [BT, BV] accumulator, loop over K
    o_BV: int = _tile(0, auto=True)                      # 0: 128 at chunks <= 64, else 64
    dqk_BK: int = _tile(64)      # dq/dk kernel: two [BT, BK] accumulators, loop over V
    dqk_BV: int = _tile(64)
    dA_BV: int = _tile(64)       # dA kernel: loop over V
    # 32 KiB at 128×64, the sweep's best: 128×128 spills registers, 64×64 doubles atomics.
    fused_BK: int = _tile(128)   # fused forward: one [BK, BV] float32 state slice per program
    fused_BV: int = _tile(64)
    fused_warps: int = _warps(0, auto=True)              # 0: by the tile size

    def __post_init__(self):
        if self.mode not in FWD_MODES:
            raise ValueError(f"ChunkLaunch.mode: expected one of {FWD_MODES}, got {self.mode!r}")
        super().__post_init__()


@dataclass(frozen=True)
class StepLaunch(_Checked):
    """The dense decoding step (`hebbian_step`, step.py): [BK, BV] float32 state tiles.

    128×128 tiles (64 KiB) with 8 warps: at the BDH state (B1 H4 K8192 V256) 256 programs,
    16-byte loads along V. The H100 sweep (BENCHMARKS.md; graph replay over 8 states, cold L2)
    put 64×128 (1024 smaller programs) at 41.7 µs per step and 128×128 at 33.3 µs; 4 warps
    spill registers at 128×128."""
    BK: int = _tile(128)
    BV: int = _tile(128)
    warps: int = _warps(8)


@dataclass(frozen=True)
class CompactLaunch(_Checked):
    """The compaction of non-zeros (`compact_nonzero`): BL-wide tiles of each row."""
    BL: int = _tile(0, auto=True)    # 0: ~32 tiles per row (the tile counts fit one block), >= 128
    warps: int = _warps(4)


@dataclass(frozen=True)
class SparseStepLaunch(_Checked):
    """The sparse kernels (`sparse_hebbian_step`, `sparse_rows_matmul`): BK active rows per
    index tile, BV columns (V for the step, D for the rows product) per program, ``splits``
    programs sharing one row's index tiles, and BL for the compaction they run when no
    idx / count is given (as `CompactLaunch.BL`)."""
    BK: int = _tile(32)
    BV: int = _tile(128)
    warps: int = _warps(4)
    splits: int = _count(0)          # 0: ~4 programs per SM over the grid (2 on the CPU)
    BL: int = _tile(0, auto=True)    # 0: CompactLaunch's rule


@dataclass(frozen=True)
class EncodeRopeLaunch(_Checked):
    """`decode_fused.encode_rope`: BB sequences by 2·BP columns per program (BP rotation pairs;
    the tile-count width is 2·BP), summing over D in BD-wide steps."""
    BP: int = _tile(64, lo=8)
    BB: int = _tile(16)
    BD: int = _tile(64)
    warps: int = _warps(4)


@dataclass(frozen=True)
class EncodeGateLaunch(_Checked):
    """`decode_fused.encode_gate`: BB sequences by BN columns per program (BN is also the
    tile-count width, so it must divide N), summing over D in BD-wide steps."""
    BN: int = _tile(128)
    BB: int = _tile(16)
    BD: int = _tile(64)
    warps: int = _warps(4)


@dataclass(frozen=True)
class ReduceLaunch(_Checked):
    """The column-parallel reduces of partial sums (`step.reduce_partials`,
    `decode_fused.reduce_layernorm`): BC columns per program."""
    BC: int = _tile(0, auto=True)    # 0: step.reduce_tiles' rule (16 or 32 by the grid size)
    warps: int = _warps(4)


# One instance of each default, built once: a call that passes no launch resolves its default
# on every launch, and constructing (and checking) a dataclass costs several µs.
DEFAULTS = MappingProxyType({cls: cls() for cls in (
    ChunkLaunch, StepLaunch, CompactLaunch, SparseStepLaunch, EncodeRopeLaunch, EncodeGateLaunch,
    ReduceLaunch)})
INTERPRETER_DEFAULTS = MappingProxyType({
    ChunkLaunch: ChunkLaunch(mode="split", BT=64, BT_bwd=64, h_BK=64, o_BV=64, fused_BK=32,
                             fused_BV=32),
    StepLaunch: StepLaunch(BK=32),
    CompactLaunch: CompactLaunch(BL=64),
    SparseStepLaunch: SparseStepLaunch(BK=16, BL=64),
})


def check_launch(launch, cls) -> None:
    """``launch`` must be None or a ``cls``: raised before any work is done."""
    if launch is not None and not isinstance(launch, cls):
        raise TypeError(f"launch: expected None or a {cls.__name__}, got "
                        f"{type(launch).__name__}")


def default_launch(cls, op: str, device, **sizes):
    """The launch of a call that passes none: ``cls``'s defaults with the tuning cache's entry
    for ``op`` at the shape class of ``sizes`` applied, or the interpreter's small tiles."""
    from ..launch import INTERPRET, shape_class, with_tuned
    if INTERPRET:
        return INTERPRETER_DEFAULTS.get(cls, DEFAULTS[cls])
    return with_tuned(DEFAULTS[cls], op, device, shape_class(**sizes))

"""The launch choices of the BSBR kernels: frozen dataclasses passed per call.

A `BSBRLaunch` holds one launch per stage (top-k routing, routed readout, local attention,
chunk states). Every public entry point takes ``launch=None``: each stage left as None gets
`kernels.launch.with_tuned(<dataclass defaults>, op, device, shape class)`, i.e. the tuning
cache's winner for this GPU model and shape class (written by `kernels/bsbr/tune.py`), else the
defaults below; on the CPU always the defaults. A stage given explicitly runs exactly as given.

The defaults are the launches the GPU sweeps picked (routing at 64×32 with tf32x3 products on 4
warps; readout blocks of 64 entries on 4 warps). A shape class names the sizes that change
which launch wins and the sequence length only as a power-of-two bucket, so a new prompt length
never misses the cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ..launch import length_bucket, shape_class, with_tuned

# The integer kernel arguments that follow the sequence: lengths, the offset into a chunk, and
# counts of slots, bank slots, chunks, picks per query, programs and segments. Triton compiles a
# separate variant of a kernel for an int argument equal to 1 or divisible by 16, so these
# would make a new prompt length (or decode position) compile again; every BSBR kernel takes
# them as plain runtime ints (`triton.jit(do_not_specialize=RUNTIME_SIZES)`; names a kernel
# lacks are ignored). Its address bases stay aligned without them: they are multiples of the
# constexpr head dims.
RUNTIME_SIZES = ("T", "Tq", "Tk", "offset", "S", "n", "nC", "NK", "NB", "NSEG", "R")

POW2_BLOCKS = (16, 32, 64, 128)
POW2_WARPS = (1, 2, 4, 8, 16)
V_TILES = (*POW2_BLOCKS, 256)


def _choice(default, choices):
    return field(default=default, metadata={"choices": tuple(choices)})


class _Checked:
    """Checks every field against its choices at construction (so does dataclasses.replace):
    a launch that exists is a launch the kernels take. Errors name the class and field."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            want = type(f.default)
            if type(value) is not want:
                raise TypeError(f"{type(self).__name__}.{f.name}: expected {want.__name__} "
                                f"(one of {choices}), got {type(value).__name__} {value!r}")
            if value not in choices:
                raise ValueError(f"{type(self).__name__}.{f.name}: expected one of {choices}, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class RoutingLaunch(_Checked):
    """The top-k routing (`routing.route`).

    method     "triton": the top-k kernel (routing_triton.py) where it takes the call (float32
               meta keys, top_k <= 16, M <= 256), else the blockwise PyTorch form; "torch":
               always the PyTorch form.
    block_q, block_s, warps: the kernel's query tile, slot tile and warps.
    precision  of the score product: "tf32x3" (three tensor-core passes, float32-level accuracy;
               picks other slots than float32 FMAs only at near-ties), "ieee" (float32 FMAs,
               the exact-selection contract) or "tf32" (one pass, ~1e-3 relative).
    """
    method: str = _choice("triton", ("triton", "torch"))
    block_q: int = _choice(64, POW2_BLOCKS)
    block_s: int = _choice(32, POW2_BLOCKS)
    warps: int = _choice(4, (1, 2, 4, 8))
    precision: str = _choice("tf32x3", ("tf32x3", "ieee", "tf32"))


@dataclass(frozen=True)
class ReadoutLaunch(_Checked):
    """The Triton routed readout (readout_triton.py, readout_grouped.py).

    mode       "grouped" (per slot, exact O(T·k·d²) work) or "tile" (per query tile over the
               union of the tile's picks).
    products   "auto" (16-bit F and operands for bfloat16 inputs only: fp16 F = KᵀV over a
               chunk can pass 65504), "16bit" (for float16 inputs too) or "float32" (float32 F).
    backward   "auto" (one pass with 16-bit products and K, V <= 128), "one_pass" (K, V <= 128)
               or "two_pass" (dq/dp, then the dF pass).
    block, warps, block_v: entries per program, warps, and the forward's V tile of the grouped
               forward and dq/dp kernels (block_v is capped at the padded V).
    df_block, df_block_v, df_warps: the dF partial pass (entries per dot, V tile, warps).
    fused_block, fused_warps: the one-pass backward's entries per program and warps (64: on an
               H100 at T = 32k, H16, D128, bf16 the whole fwd+bwd took 10.4 ms with 64 and
               13.4 ms with 32; two passes took 10.6 ms).
    """
    mode: str = _choice("grouped", ("grouped", "tile"))
    products: str = _choice("auto", ("auto", "16bit", "float32"))
    backward: str = _choice("auto", ("auto", "one_pass", "two_pass"))
    block: int = _choice(64, POW2_BLOCKS)
    warps: int = _choice(4, POW2_WARPS)
    block_v: int = _choice(64, V_TILES)
    df_block: int = _choice(64, POW2_BLOCKS)
    df_block_v: int = _choice(128, V_TILES)
    df_warps: int = _choice(8, POW2_WARPS)
    fused_block: int = _choice(64, POW2_BLOCKS)
    fused_warps: int = _choice(8, POW2_WARPS)


@dataclass(frozen=True)
class LocalLaunch(_Checked):
    """The Triton chunk-local attention: row and key tiles of min(block, padded chunk size)."""
    block: int = _choice(64, POW2_BLOCKS)
    warps: int = _choice(4, POW2_WARPS)


@dataclass(frozen=True)
class StatesLaunch(_Checked):
    """The Triton chunk states: rows per product (capped at the padded chunk size), the V tile
    and warps."""
    block_t: int = _choice(64, POW2_BLOCKS)
    block_v: int = _choice(64, POW2_BLOCKS)
    warps: int = _choice(4, POW2_WARPS)


# Each stage's op name in the tuning cache and its launch class (read-only).
STAGES = MappingProxyType({"routing": ("bsbr.routing", RoutingLaunch),
                           "readout": ("bsbr.readout", ReadoutLaunch),
                           "local": ("bsbr.local", LocalLaunch),
                           "states": ("bsbr.states", StatesLaunch)})


@dataclass(frozen=True)
class BSBRLaunch:
    """One launch per stage; None: the tuning cache's entry or the defaults (see the module
    docstring)."""
    routing: RoutingLaunch | None = None
    readout: ReadoutLaunch | None = None
    local: LocalLaunch | None = None
    states: StatesLaunch | None = None

    def __post_init__(self):
        for name, (_, cls) in STAGES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"BSBRLaunch.{name}: expected a {cls.__name__} or None, got "
                                f"{type(value).__name__}")


def shape_classes(*, dtype: torch.dtype, T: int, K: int, V: int, chunk_size: int, M: int = 0,
                  top_k=None) -> dict[str, str]:
    """The shape class of each stage: the sizes its launch depends on, with T bucketed."""
    T, k = length_bucket(T), "all" if top_k is None else top_k
    return {"routing": shape_class(M=M, C=chunk_size, k=k, T=T, dtype=dtype),
            "readout": shape_class(K=K, V=V, C=chunk_size, k=k, T=T, dtype=dtype),
            "local": shape_class(K=K, V=V, C=chunk_size, T=T, dtype=dtype),
            "states": shape_class(K=K, V=V, C=chunk_size, T=T, dtype=dtype)}


# One instance of each default (frozen), so a call without a cache entry constructs nothing.
_UNSET = BSBRLaunch()
_DEFAULTS = MappingProxyType({name: cls() for name, (_, cls) in STAGES.items()})


def check_launch(launch) -> BSBRLaunch:
    if launch is None:
        return _UNSET
    if not isinstance(launch, BSBRLaunch):
        raise TypeError(f"launch: expected a kernels.bsbr.BSBRLaunch or None, got "
                        f"{type(launch).__name__}")
    return launch


def resolve(launch: BSBRLaunch, device, classes: dict[str, str]) -> BSBRLaunch:
    """``launch`` with each stage named in ``classes`` that it leaves None filled in from the
    tuning cache (or the defaults)."""
    filled = {name: with_tuned(_DEFAULTS[name], STAGES[name][0], device, cls)
              for name, cls in classes.items() if getattr(launch, name) is None}
    return dataclasses.replace(launch, **filled) if filled else launch

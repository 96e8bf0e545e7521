"""One decoding step of Hebbian attention in Triton, the state updated in place (float32).

    strict (BDH):  o = scale · q S        then  S ← γ S + kᵀ v
    inclusive:     S ← γ S + kᵀ v        then  o = scale · q S

The step is bound by memory: it must read and write the whole float32 state (B·H·K·V·8 bytes)
and does 4 flops per element. The grid tiles the state in [BK, BV] blocks across the whole chip
(grid (cdiv(K, BK), cdiv(V, BV), B·H)); each program reads its tile once, writes it once, and
leaves its share of q S (a [BV] partial sum over its BK rows) in a float32 buffer that a
second, tiny kernel sums over the K tiles, scales and casts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import INTERPRET, length_bucket, pow2_tile
from .function import check_grid
from .launches import ReduceLaunch, StepLaunch, default_launch


@triton.jit
def fused_recurrent_hebbian_step_kernel(q, k, v, state, part, log2g, scale, H, HV, K, V,
                                        BK: tl.constexpr, BV: tl.constexpr,
                                        HAS_DECAY: tl.constexpr, STRICT: tl.constexpr):
    i_k, i_v = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = state + i_bh * K * V + (o_k[:, None] * V + o_v[None, :])
    b_s = tl.load(p_s, mask=m_kv, other=0.)
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.).to(tl.float32) * scale
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.).to(tl.float32)
    b_v = tl.load(v + (i_b * HV + i_h % HV) * V + o_v, mask=m_v, other=0.).to(tl.float32)
    if STRICT:
        b_o = tl.sum(b_q[:, None] * b_s, axis=0)
    if HAS_DECAY:
        b_s *= tl.exp2(tl.load(log2g + i_h).to(tl.float32))
    b_s += b_k[:, None] * b_v[None, :]
    if not STRICT:
        b_o = tl.sum(b_q[:, None] * b_s, axis=0)
    tl.store(p_s, b_s, mask=m_kv)
    n_k = tl.num_programs(0)
    tl.store(part + (i_bh * n_k + i_k) * V + o_v, b_o, mask=m_v)


@triton.jit
def sum_partials(part, row, NS, V, o_v, m_v, BS: tl.constexpr, BV: tl.constexpr):
    """Σ_s part[row, s, o_v] in float32, BS partial rows per load, tiles summed in order
    (deterministic for a given BS and BV). Loading many rows at once pays with the narrow
    column blocks of `reduce_tiles` (up to 256 rows per load); on its own, with one program per
    row, it did not (H200: still ~8.8 µs per launch for ~264 partials)."""
    o_s = tl.arange(0, BS)
    acc = tl.zeros([BV], tl.float32)
    for s0 in range(0, NS, BS):
        m_s = (s0 + o_s) < NS
        acc += tl.sum(tl.load(part + (row * NS + s0 + o_s[:, None]) * V + o_v[None, :],
                              mask=m_s[:, None] & m_v[None, :], other=0.), 0)
    return acc


def partial_rows_per_load(NS: int, BV: int) -> int:
    """BS for `sum_partials`: a power of two, at most 256 rows and at most next_pow2(NS), with
    BS·BV ≤ 8192 elements (a float32 tile of at most 32 KB). With the narrow column blocks of
    `reduce_tiles` (16–32 columns) one load takes 256 partial rows, so ~66 or ~528 partials are
    1–3 loads instead of a long chain of small dependent ones."""
    return max(1, min(256, triton.next_power_of_2(NS), 8192 // BV))


def reduce_tiles(R: int, NS: int, V: int, launch: ReduceLaunch = ReduceLaunch()
                 ) -> tuple[int, int]:
    """(BV, BS) for a column-parallel reduce of part [R, NS, V] on a grid (cdiv(V, BV), R):
    BV is ``launch.BC``, or by the rule below when that is 0.

    Why narrow columns: at batch 1 R is 1–4 rows of V = 256; one program per row (BV ≥ V) left
    the whole sum to 1–4 SMs (~9–17 µs per launch in the H200 profile). BV = 32 reads a
    128-byte line per partial row; when that gives fewer than 64 programs, BV = 16 doubles
    them (R = 4, V = 256: 64 programs). BS then takes as many partial rows per load as the
    32 KB tile allows (`partial_rows_per_load`). Measured on the H200: the unfused sparse
    step's reduce went from 17.5 to 2.1 µs per launch."""
    BV = launch.BC or (32 if R * triton.cdiv(V, 32) >= 64 else 16)
    return BV, partial_rows_per_load(NS, BV)


@triton.jit
def fused_recurrent_hebbian_reduce_kernel(part, o, NK, V, BS: tl.constexpr, BV: tl.constexpr):
    """o[bh, v] = Σ_k part[bh, k, v], cast to o's dtype. grid (cdiv(V, BV), B·H)."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = sum_partials(part, i_bh, NK, V, o_v, m_v, BS, BV)
    tl.store(o + i_bh * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


def hebbian_step_triton(q, k, v, state, *, scale=1.0, strict=True, decay=None,
                        launch: StepLaunch | None = None):
    """q, k [B,H,K]; v [B,H,V] or [B,1,V]; state [B,H,K,V] float32 (validated by the caller),
    updated in place. Returns (o [B,H,V] in v's dtype, state). ``launch``: the state tiles
    (`StepLaunch`); None: the default for the shape."""
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    check_grid(B, H)
    if INTERPRET and q.dtype == torch.bfloat16:
        # The interpreter mis-loads bf16: run the step in float32 (the state is float32 anyway).
        o, state = hebbian_step_triton(q.float(), k.float(), v.float(), state, scale=scale,
                                       strict=strict, decay=decay, launch=launch)
        return o.to(v.dtype), state
    if not state.is_contiguous():
        raise ValueError("state: expected a contiguous tensor (it is updated in place), got "
                         f"strides {tuple(state.stride())}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    log2g = None if decay is None else torch.log2(decay.float()).contiguous()
    launch = launch or default_launch(StepLaunch, "hebbian_step", q.device, K=K, V=V,
                                      BH=length_bucket(B * H), dtype=q.dtype)
    BK, BV = pow2_tile(K, launch.BK), pow2_tile(V, launch.BV)
    n_k = triton.cdiv(K, BK)
    part = torch.empty(B * H, n_k, V, dtype=torch.float32, device=q.device)
    fused_recurrent_hebbian_step_kernel[(n_k, triton.cdiv(V, BV), B * H)](
        q, k, v, state, part, log2g if log2g is not None else q, float(scale), H, HV, K, V,
        BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=bool(strict),
        num_warps=launch.warps)
    o = torch.empty(B, H, V, dtype=v.dtype, device=q.device)
    reduce_partials(part, o.view(B * H, V))
    return o, state


def reduce_partials(part: torch.Tensor, out: torch.Tensor,
                    launch: ReduceLaunch | None = None) -> torch.Tensor:
    """out[r] = Σ_s part[r, s] (fixed order), cast to out's dtype. part [R, NS, V] float32,
    out [R, V] contiguous. Narrow column blocks (`reduce_tiles`): many programs at R = 1–4."""
    R, NS, V = part.shape
    launch = launch or default_reduce_launch(R, NS, V, part.device)
    RB, RS = reduce_tiles(R, NS, V, launch)
    fused_recurrent_hebbian_reduce_kernel[(triton.cdiv(V, RB), R)](
        part, out, NS, V, BS=RS, BV=RB, num_warps=launch.warps)
    return out


def default_reduce_launch(R: int, NS: int, V: int, device) -> ReduceLaunch:
    return default_launch(ReduceLaunch, "hebbian_reduce", device, R=length_bucket(R),
                          NS=length_bucket(NS), V=V)

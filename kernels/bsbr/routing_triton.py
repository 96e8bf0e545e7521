"""Top-k routing in Triton: scores, selection and their backward without a [T, S] score matrix.

Same contract as `routing._SelectedScores` (the PyTorch form, which stays the reference of the
tests): for each query i, the top-k of s_ij = r_i · h_j / √M over the slots it may read (bank
slots j < n, and the call's chunks j − n < c_i), as (idx, selected score), idx = −1 where fewer
than k slots are valid.

  fwd  grid (cdiv(Tq, BQ), B·H). A program scores its BQ queries against BS slots at a time
       (one tl.dot at the launch's precision: tf32x3 by default, float32 "ieee" for the exact
       selection of the PyTorch matmul; see `RoutingLaunch`) and merges each tile into a
       running top-k held in registers: rounds of "the tile's best beats the running minimum →
       replace it", only while some row still gains (at most k). Ties keep the earlier slot.
       The slot loop stops at the block's last causal slot. Finally the k kept are written in
       descending order. Work O(T·S·M), but no [BQ, S] block in memory, no masked_fill / topk /
       where passes over it.
       Non-finite scores keep the contract of `routing.route`: a NaN score enters the merge as
       +inf (so it is kept, as torch.topk keeps NaN first) and is written as +inf, which makes
       the query's weights NaN; a block whose r holds an inf scores with "ieee" products (a
       split-precision product would turn inf · h into NaN where the reference has -inf).
  bwd  dr_i = Σ_k g_ik h_{idx_ik}: grid (cdiv(Tq, BQ), B·H), k gathered rows per query.
       dh_j = Σ_{(i,k) that picked j} g_ik r_i over the inverse index (one stable sort of the
       entries by slot, `readout_triton._inverse_index`, or the readout's own when the caller
       shares one: `SharedInverseIndex`): per segment of each slot's run, then
       per slot in segment order (`readout_triton._sum_segments`): deterministic, no atomics.
       O(T·k·M) where the PyTorch backward scatters into a dense [BQ, S] block and multiplies
       it: O(T·S·M), quadratic in T at a fixed chunk size.

Why a kernel: `torch.topk` over [BQ, S] blocks and the dense score matmuls were a sixth of a
BSBR forward and backward at T = 32k on an H200, and the PyTorch backward's O(T·S) made the
fwd+bwd time grow faster than T. The causal bound and the merge rounds that stop when no row
gains cut the kernel's own time by about half; tf32x3 products at 64×32 by another 3.5×.
Used for top_k ≤ MAX_TOP_K (the k ordered writes are unrolled); dense routing keeps the PyTorch
form. k is top_k itself, never min(top_k, S): it is a constexpr, and a prompt shorter than
top_k chunks would otherwise compile a variant per chunk count (the extra picks are -1).

Packed sequences (`kernels.bsbr.varlen`): ``chunk_lo`` [chunks] int32 gives each query chunk
the first chunk of its sequence; a query reads only chunks j with chunk_lo[c_i] <= j < c_i,
and a block's slot loop starts at its lowest bound (no bank: n = 0). r and dr lie in either
layout (layout.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import RUNTIME_SIZES as SIZES
from .launch import RoutingLaunch
from .layout import empty_as, stored_as, token_rows
from .readout_triton import _sum_segments, inverse_index, slot_segments

MAX_TOP_K = 16


@triton.jit(do_not_specialize=SIZES)
def _route_topk_fwd(r, h, idx, sel, lo, H, Tq, S, n, offset, C, inv,
                    M: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
                    KK: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr,
                    HAS_LO: tl.constexpr, BTHK: tl.constexpr):
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    r, sr = token_rows(r, bh, H, Tq, M, BTHK)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Tq
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    b_r = tl.load(r + o_q[:, None] * sr + o_m[None, :],
                  mask=m_q[:, None] & m_m[None, :], other=0.).to(tl.float32)
    r_inf = tl.max(tl.max((tl.abs(b_r) == float("inf")).to(tl.int32), 1), 0) > 0
    c_q = (o_q + offset) // C                                   # each query's chunk
    o_p = tl.arange(0, KP)
    # Padding columns (KP > KK) hold +inf, so they are never the minimum that gets replaced.
    best_v = tl.where(o_p[None, :] < KK, float("-inf"), float("inf")) + tl.zeros([BQ, KP],
                                                                                   tl.float32)
    best_i = tl.zeros([BQ, KP], tl.int32) - 1
    o_b = tl.arange(0, BS)
    # Causal bound: no query of this block may read a call chunk at or past the last query's
    # chunk, so the slot loop stops at n + c_last instead of S (half the tiles on average).
    c_last = (tl.minimum(i_q * BQ + BQ, Tq) - 1 + offset) // C
    s_hi = tl.minimum(S, n + c_last)
    s_lo = 0
    if HAS_LO:
        # Packed sequences (no bank): query i reads only the chunks j >= lo[c_i], its own
        # sequence's; the loop starts at the block's lowest bound.
        lo_q = tl.load(lo + c_q, mask=m_q, other=0)
        s_lo = (tl.min(tl.where(m_q, lo_q, S), 0) // BS) * BS
    for s0 in range(s_lo, s_hi, BS):
        o_s = s0 + o_b
        m_s = o_s < S
        b_h = tl.load(h + bh * S * M + o_s[:, None] * M + o_m[None, :],
                      mask=m_s[:, None] & m_m[None, :], other=0.).to(tl.float32)
        if r_inf:
            b_s = tl.dot(b_r, tl.trans(b_h), input_precision="ieee") * inv
        else:
            b_s = tl.dot(b_r, tl.trans(b_h), input_precision=PREC) * inv        # [BQ, BS]
        ok = m_s[None, :] & ((o_s[None, :] < n) | ((o_s[None, :] - n) < c_q[:, None]))
        if HAS_LO:
            ok = ok & (o_s[None, :] >= lo_q[:, None])
        b_s = tl.where(b_s != b_s, float("inf"), b_s)                       # NaN is kept
        b_s = tl.where(ok, b_s, float("-inf"))
        # Merge rounds only while some row's tile best beats its running minimum: after the
        # first tiles most tiles add nothing, so this runs ~0-2 rounds instead of k.
        t_max = tl.max(b_s, 1)
        cur_min = tl.min(best_v, 1)
        while tl.max((t_max > cur_min).to(tl.int32), 0) > 0:
            t_arg = tl.argmax(b_s, 1)
            cur_arg = tl.argmin(best_v, 1)
            put = (t_max > cur_min)[:, None] & (o_p[None, :] == cur_arg[:, None])
            best_v = tl.where(put, t_max[:, None], best_v)
            best_i = tl.where(put, (s0 + t_arg)[:, None].to(tl.int32), best_i)
            b_s = tl.where(o_b[None, :] == t_arg[:, None], float("-inf"), b_s)
            t_max = tl.max(b_s, 1)
            cur_min = tl.min(best_v, 1)
    # Write the kept ones in descending order; a -inf score means no valid slot: idx -1.
    free = o_p[None, :] < KK
    for kk in tl.static_range(KK):
        key = tl.where(free, best_v, float("-inf"))
        v = tl.max(key, 1)
        a = tl.argmax(key, 1)
        pick = o_p[None, :] == a[:, None]
        i = tl.sum(tl.where(pick, best_i, 0), 1)
        i = tl.where(v > float("-inf"), i, -1)
        tl.store(idx + (bh * Tq + o_q) * KK + kk, i, mask=m_q)
        tl.store(sel + (bh * Tq + o_q) * KK + kk, v.to(sel.dtype.element_ty), mask=m_q)
        free = free & ~pick


@triton.jit(do_not_specialize=SIZES)
def _route_bwd_dr(h, idx, g, dr, H, Tq, S, M: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr,
                  KK: tl.constexpr, BTHK: tl.constexpr):
    """dr_i = Σ_k g_ik h_{idx_ik} (g already 0 where idx = -1 and scaled by 1/√M)."""
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    dr, sdr = token_rows(dr, bh, H, Tq, M, BTHK)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Tq
    o_m = tl.arange(0, BM)
    m_qm = m_q[:, None] & (o_m[None, :] < M)
    acc = tl.zeros([BQ, BM], tl.float32)
    for kk in tl.static_range(KK):
        j = tl.load(idx + (bh * Tq + o_q) * KK + kk, mask=m_q, other=-1)
        w = tl.load(g + (bh * Tq + o_q) * KK + kk, mask=m_q, other=0.)
        b_h = tl.load(h + bh * S * M + tl.maximum(j, 0).to(tl.int64)[:, None] * M + o_m[None, :],
                      mask=m_qm & (j >= 0)[:, None], other=0.).to(tl.float32)
        acc += w[:, None] * b_h
    tl.store(dr + o_q[:, None] * sdr + o_m[None, :], acc.to(dr.dtype.element_ty), mask=m_qm)


@triton.jit(do_not_specialize=SIZES)
def _route_bwd_dh_partial(r, g, order, seg_slot, seg_e0, seg_e1, P, H, Tq, S, NSEG,
                          M: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, KK: tl.constexpr,
                          BTHK: tl.constexpr):
    """P[seg] = Σ over one segment of a slot's sorted entries of g_e r_{t(e)} (fixed order)."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    r, sr = token_rows(r, bh, H, Tq, M, BTHK)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    j = tl.load(seg_slot + bh * NSEG + i_s)
    if j < S:                       # pseudo-slot S (idx = -1) and spare programs: nothing to do
        e_lo = tl.load(seg_e0 + bh * NSEG + i_s)
        e_hi = tl.load(seg_e1 + bh * NSEG + i_s)
        # One [BE, BM] accumulator, reduced over its rows once at the end: a tl.sum per block
        # is a cross-warp reduction (shared memory and a barrier) between dependent gathers.
        acc = tl.zeros([BE, BM], tl.float32)
        for start in range(e_lo, e_hi, BE):
            o_e = start + tl.arange(0, BE)
            m_e = o_e < e_hi
            ent = tl.load(order + bh * Tq * KK + o_e, mask=m_e, other=0)
            w = tl.load(g + bh * Tq * KK + ent, mask=m_e, other=0.)
            t = ent // KK
            b_r = tl.load(r + t[:, None] * sr + o_m[None, :],
                          mask=m_e[:, None] & m_m[None, :], other=0.).to(tl.float32)
            acc += w[:, None] * b_r
        tl.store(P + (bh * NSEG + i_s) * M + o_m, tl.sum(acc, 0), mask=m_m)


def _bm(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


class SelectedScoresTriton(torch.autograd.Function):
    """(idx [B,H,Tq,k] int64, selected scores [B,H,Tq,k] in h's dtype) as
    `routing._SelectedScores`, differentiable in r and h through the selected scores."""

    @staticmethod
    def forward(ctx, r, h, n, offset, chunk_size, kk, inverse=None,
                launch: RoutingLaunch = RoutingLaunch(), chunk_lo=None, bthk=False):
        B, H, Tq, M = r.shape
        S = h.shape[2]
        r, h = stored_as(r, bthk), h.contiguous()
        idx = torch.empty(B, H, Tq, kk, dtype=torch.int32, device=r.device)
        sel = torch.empty(B, H, Tq, kk, dtype=h.dtype, device=r.device)
        BQ = launch.block_q
        lo = idx if chunk_lo is None else chunk_lo          # not read without HAS_LO
        _route_topk_fwd[(triton.cdiv(Tq, BQ), B * H)](
            r, h, idx, sel, lo, H, Tq, S, n, offset, chunk_size, 1.0 / math.sqrt(M), M=M,
            BM=_bm(M), BQ=BQ, BS=launch.block_s, KK=kk, KP=max(2, triton.next_power_of_2(kk)),
            PREC=launch.precision, HAS_LO=chunk_lo is not None, BTHK=bthk,
            num_warps=launch.warps)
        ctx.save_for_backward(r, h, idx)
        ctx.mark_non_differentiable(idx)
        ctx.kk, ctx.inverse, ctx.bthk = kk, inverse, bthk
        return idx.long(), sel

    @staticmethod
    def backward(ctx, _didx, dsel):
        r, h, idx = ctx.saved_tensors
        B, H, Tq, M = r.shape
        S, kk = h.shape[2], ctx.kk
        g = (torch.where(idx >= 0, dsel.float(), 0.0) / math.sqrt(M)).contiguous()
        bthk = ctx.bthk
        dr = empty_as(B, H, Tq, M, bthk, dtype=r.dtype, device=r.device)
        dh = torch.empty_like(h)
        BQ = 32
        _route_bwd_dr[(triton.cdiv(Tq, BQ), B * H)](h, idx, g, dr, H, Tq, S, M=M, BM=_bm(M),
                                                     BQ=BQ, KK=kk, BTHK=bthk, num_warps=4)
        # dh by segments of each slot's sorted entries, then per slot in order: one program
        # per slot serialised the early slots (picked by most later queries). Deterministic,
        # no atomics, as readout_triton.routed_readout_dF.
        order, starts = inverse_index(idx, S, ctx.inverse)
        seg, e0, e1, NSEG, seg_end, seg_n = slot_segments(order, starts, S, Tq * kk)
        P = torch.empty(B * H, NSEG, M, dtype=torch.float32, device=r.device)
        _route_bwd_dh_partial[(NSEG, B * H)](r, g, order, seg, e0, e1, P, H, Tq, S, NSEG, M=M,
                                             BM=_bm(M), BE=32, KK=kk, BTHK=bthk, num_warps=4)
        _sum_segments[(S, 1, B * H)](P, seg_end, seg_n, dh, S, NSEG, M, BLK=_bm(M))
        return dr, dh, None, None, None, None, None, None, None, None

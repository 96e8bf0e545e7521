"""Top-k routing in Triton: scores, selection and their backward without a [T, S] score matrix.

Same contract as `routing._SelectedScores` (the PyTorch form, which stays the reference of the
tests): for each query i, the top-k of s_ij = r_i · h_j / √M over the slots it may read (bank
slots j < n, and the call's chunks j − n < c_i), as (idx, selected score), idx = −1 where fewer
than k slots are valid.

  fwd  grid (cdiv(Tq, BQ), B·H). A program scores its BQ queries against BS slots at a time
       (one tl.dot, float32 "ieee" like the PyTorch matmul, so both pick the same slots) and
       merges each tile into a running top-k held in registers: rounds of "the tile's best
       beats the running minimum → replace it", only while some row still gains (at most k).
       Ties keep the earlier slot. The slot loop stops at the block's last causal slot.
       Finally the k kept are written in descending order. Work O(T·S·M) as before, but no [BQ, S] block in memory,
       no masked_fill / topk / where passes over it.
  bwd  dr_i = Σ_k g_ik h_{idx_ik}: grid (cdiv(Tq, BQ), B·H), k gathered rows per query.
       dh_j = Σ_{(i,k) that picked j} g_ik r_i: grid (S, B·H) over the inverse index (one
       stable sort of the entries by slot, `readout_triton._inverse_index`), in a fixed order:
       deterministic, no atomics. O(T·k·M) where the PyTorch backward scatters into a dense
       [BQ, S] block and multiplies it: O(T·S·M), quadratic in T at a fixed chunk size.

Why: on the H200 at T = 32k (BENCHMARKS.md, 2026-11-29) `torch.topk` alone took 3.4 ms of a
23 ms BSBR fwd+bwd, and the routing's dense matmuls 2.2 ms; the O(T·S) backward is also why the
fwd+bwd slope was 1.39–1.83 rather than 1. This kernel replaced both (measured 12-04). Its first
version still took 3.5 ms of a 16.6 ms fwd+bwd at 32k (H200 profile, 12-04): k merge rounds for
every tile of every slot, causal or not. The causal bound and the rounds that stop when no row
gains are expected to take it under 1 ms (not yet measured).
Used for top_k ≤ MAX_TOP_K (the k rounds are unrolled); dense routing keeps the PyTorch form.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .readout_triton import _inverse_index

MAX_TOP_K = 16


@triton.jit
def _route_topk_fwd(r, h, idx, sel, Tq, S, n, offset, C, inv,
                    M: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
                    KK: tl.constexpr, KP: tl.constexpr, PREC: tl.constexpr):
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    o_q = i_q * BQ + tl.arange(0, BQ)
    m_q = o_q < Tq
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    b_r = tl.load(r + bh * Tq * M + o_q[:, None] * M + o_m[None, :],
                  mask=m_q[:, None] & m_m[None, :], other=0.).to(tl.float32)
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
    for s0 in range(0, s_hi, BS):
        o_s = s0 + o_b
        m_s = o_s < S
        b_h = tl.load(h + bh * S * M + o_s[:, None] * M + o_m[None, :],
                      mask=m_s[:, None] & m_m[None, :], other=0.).to(tl.float32)
        b_s = tl.dot(b_r, tl.trans(b_h), input_precision=PREC) * inv            # [BQ, BS]
        ok = m_s[None, :] & ((o_s[None, :] < n) | ((o_s[None, :] - n) < c_q[:, None]))
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


@triton.jit
def _route_bwd_dr(h, idx, g, dr, Tq, S, M: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr,
                  KK: tl.constexpr):
    """dr_i = Σ_k g_ik h_{idx_ik} (g already 0 where idx = -1 and scaled by 1/√M)."""
    i_q, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
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
    tl.store(dr + (bh * Tq + o_q)[:, None] * M + o_m[None, :], acc.to(dr.dtype.element_ty),
             mask=m_qm)


@triton.jit
def _route_bwd_dh(r, g, order, starts, dh, Tq, S, M: tl.constexpr, BM: tl.constexpr,
                  BE: tl.constexpr, KK: tl.constexpr):
    """dh_j = Σ over the entries that picked slot j (sorted, fixed order) of g_e r_{t(e)}."""
    i_j, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    e0 = tl.load(starts + bh * (S + 1) + i_j)
    e1 = tl.load(starts + bh * (S + 1) + i_j + 1)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    acc = tl.zeros([BM], tl.float32)
    for start in range(e0, e1, BE):
        o_e = start + tl.arange(0, BE)
        m_e = o_e < e1
        ent = tl.load(order + bh * Tq * KK + o_e, mask=m_e, other=0)
        w = tl.load(g + bh * Tq * KK + ent, mask=m_e, other=0.)
        t = (ent // KK).to(tl.int64)
        b_r = tl.load(r + (bh * Tq + t)[:, None] * M + o_m[None, :],
                      mask=m_e[:, None] & m_m[None, :], other=0.).to(tl.float32)
        acc += tl.sum(w[:, None] * b_r, 0)
    tl.store(dh + (bh * S + i_j) * M + o_m, acc.to(dh.dtype.element_ty), mask=m_m)


# Benchmarks may pin the top-k forward's launch: {"BQ": 64, "BS": 32, "warps": 4,
# "prec": "tf32x3"}; empty normally. "prec" is the score product's input precision: "ieee"
# (float32 FMAs, the default: it picks the same slots as the PyTorch matmul) or "tf32x3" (three
# tensor-core passes, float32-level accuracy, last bits may differ).
ROUTE_LAUNCH: dict = {}


def route_launch():
    """(BQ, BS, num_warps, input precision) of the top-k forward: defaults or the pins."""
    bq, bs = ROUTE_LAUNCH.get("BQ", 32), ROUTE_LAUNCH.get("BS", 32)
    warps, prec = ROUTE_LAUNCH.get("warps", 4), ROUTE_LAUNCH.get("prec", "ieee")
    for name, value, ok in (("BQ", bq, (16, 32, 64, 128)), ("BS", bs, (16, 32, 64, 128)),
                            ("warps", warps, (1, 2, 4, 8)),
                            ("prec", prec, ("ieee", "tf32", "tf32x3"))):
        if value not in ok:
            raise ValueError(f"ROUTE_LAUNCH[{name!r}]: expected one of {ok}, got {value!r}")
    return bq, bs, warps, prec


def _bm(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


class SelectedScoresTriton(torch.autograd.Function):
    """(idx [B,H,Tq,k] int64, selected scores [B,H,Tq,k] in h's dtype) as
    `routing._SelectedScores`, differentiable in r and h through the selected scores."""

    @staticmethod
    def forward(ctx, r, h, n, offset, chunk_size, kk):
        B, H, Tq, M = r.shape
        S = h.shape[2]
        r, h = r.contiguous(), h.contiguous()
        idx = torch.empty(B, H, Tq, kk, dtype=torch.int32, device=r.device)
        sel = torch.empty(B, H, Tq, kk, dtype=h.dtype, device=r.device)
        BQ, BS, warps, prec = route_launch()
        _route_topk_fwd[(triton.cdiv(Tq, BQ), B * H)](
            r, h, idx, sel, Tq, S, n, offset, chunk_size, 1.0 / math.sqrt(M), M=M, BM=_bm(M),
            BQ=BQ, BS=BS, KK=kk, KP=max(2, triton.next_power_of_2(kk)), PREC=prec,
            num_warps=warps)
        ctx.save_for_backward(r, h, idx)
        ctx.mark_non_differentiable(idx)
        ctx.kk = kk
        return idx.long(), sel

    @staticmethod
    def backward(ctx, _didx, dsel):
        r, h, idx = ctx.saved_tensors
        B, H, Tq, M = r.shape
        S, kk = h.shape[2], ctx.kk
        g = (torch.where(idx >= 0, dsel.float(), 0.0) / math.sqrt(M)).contiguous()
        dr = torch.empty(B, H, Tq, M, dtype=r.dtype, device=r.device)
        dh = torch.empty_like(h)
        BQ = 32
        _route_bwd_dr[(triton.cdiv(Tq, BQ), B * H)](h, idx, g, dr, Tq, S, M=M, BM=_bm(M), BQ=BQ,
                                                     KK=kk, num_warps=4)
        order, starts = _inverse_index(idx, S)
        _route_bwd_dh[(S, B * H)](r, g, order, starts, dh, Tq, S, M=M, BM=_bm(M), BE=32, KK=kk,
                                  num_warps=4)
        return dr, dh, None, None, None, None

"""Chunk-local causal softmax attention in Triton: forward and backward (flash-style).

Work is tiled in KEY-POSITION space: position p = offset + i holds query i, positions < offset
hold only the partial chunk's earlier keys. Row p sees keys s with c(s) = c(p) and s <= p, so a
tile of BT rows loops over keys from the start of its first row's chunk to its last row (at most
C + BT keys), one BS block at a time, with an online softmax (exp2 domain, running max m and sum l).
C need not be a multiple of BT: a tile that spans a chunk boundary masks per row.

  fwd   grid (row tiles from position offset on, B·H): o, and lse (log2 domain) per query
  dq    same grid and loop as fwd, P recomputed from lse
  dkdv  grid (cdiv(Tk, BS), B·H): key tile, loop over the rows of the chunk(s) that see it
delta = rowsum(o·do) is one PyTorch reduction. Whole K and V in one tile (K, V <= 256).
Addresses: the (b,h) base is int64; in-tile offsets stay int32 (< Tk·max(K,V) < 2^31).
q, k, v, o and their gradients lie in either layout (layout.py, BTHK); lse and delta are
[B,H,Tq]. Lengths and the offset are runtime ints (no compiled variant per length).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..launch import dot_precision, pow2_tile
from .launch import RUNTIME_SIZES as SIZES
from .launch import LocalLaunch
from .layout import empty_as, stored_as, token_rows
from .validate import TRITON_MAX_HEAD_DIM

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=SIZES)
def _local_fwd(q, k, v, o, lse, H, Tq, Tk, offset, C, scale_log2,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, BTHK: tl.constexpr):
    i_t, i_bh = tl.program_id(0) + offset // BT, tl.program_id(1)     # first tile holding a query
    bh = i_bh.to(tl.int64)
    q, sq = token_rows(q, bh, H, Tq, K, BTHK)
    k, sk = token_rows(k, bh, H, Tk, K, BTHK)
    v, sv = token_rows(v, bh, H, Tk, V, BTHK)
    o, so = token_rows(o, bh, H, Tq, V, BTHK)
    lse += bh * Tq
    o_p = i_t * BT + tl.arange(0, BT)                       # key positions of the rows
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_row = (o_p >= offset) & (o_p < Tk)
    o_i = o_p - offset                                      # query index of the row
    b_q = tl.load(q + o_i[:, None] * sq + o_k[None, :], mask=m_row[:, None] & (o_k[None, :] < K),
                  other=0.)
    c_start = (o_p // C) * C
    b_m = tl.full([BT], float("-inf"), tl.float32)
    b_l = tl.zeros([BT], tl.float32)
    b_acc = tl.zeros([BT, BV], tl.float32)
    lo = ((i_t * BT) // C) * C
    hi = tl.minimum(i_t * BT + BT, Tk)
    for s0 in range(lo, hi, BS):
        o_s = s0 + tl.arange(0, BS)
        m_s = o_s < Tk
        b_k = tl.load(k + o_s[:, None] * sk + o_k[None, :],
                      mask=m_s[:, None] & (o_k[None, :] < K), other=0.)
        b_v = tl.load(v + o_s[:, None] * sv + o_v[None, :],
                      mask=m_s[:, None] & (o_v[None, :] < V), other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
        m_vis = (o_s[None, :] >= c_start[:, None]) & (o_s[None, :] <= o_p[:, None]) & m_s[None, :]
        b_s = tl.where(m_vis, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)   # rows with nothing yet
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_m_new
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    b_o = b_acc / b_l_safe[:, None]
    tl.store(o + o_i[:, None] * so + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_row[:, None] & (o_v[None, :] < V))
    tl.store(lse + o_i, b_m + tl.log2(b_l_safe), mask=m_row)


@triton.jit(do_not_specialize=SIZES)
def _local_bwd_dq(q, k, v, do, lse, delta, dq, H, Tq, Tk, offset, C, scale_log2, scale,
                  K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, BTHK: tl.constexpr):
    i_t, i_bh = tl.program_id(0) + offset // BT, tl.program_id(1)
    bh = i_bh.to(tl.int64)
    q, sq = token_rows(q, bh, H, Tq, K, BTHK)
    dq, sdq = token_rows(dq, bh, H, Tq, K, BTHK)
    k, sk = token_rows(k, bh, H, Tk, K, BTHK)
    v, sv = token_rows(v, bh, H, Tk, V, BTHK)
    do, sdo = token_rows(do, bh, H, Tq, V, BTHK)
    lse += bh * Tq
    delta += bh * Tq
    o_p = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_row = (o_p >= offset) & (o_p < Tk)
    o_i = o_p - offset
    m_qk = m_row[:, None] & (o_k[None, :] < K)
    b_q = tl.load(q + o_i[:, None] * sq + o_k[None, :], mask=m_qk, other=0.)
    b_do = tl.load(do + o_i[:, None] * sdo + o_v[None, :],
                   mask=m_row[:, None] & (o_v[None, :] < V), other=0.)
    b_lse = tl.load(lse + o_i, mask=m_row, other=0.)
    b_delta = tl.load(delta + o_i, mask=m_row, other=0.)
    c_start = (o_p // C) * C
    b_dq = tl.zeros([BT, BK], tl.float32)
    lo = ((i_t * BT) // C) * C
    hi = tl.minimum(i_t * BT + BT, Tk)
    for s0 in range(lo, hi, BS):
        o_s = s0 + tl.arange(0, BS)
        m_s = o_s < Tk
        b_k = tl.load(k + o_s[:, None] * sk + o_k[None, :],
                      mask=m_s[:, None] & (o_k[None, :] < K), other=0.)
        b_v = tl.load(v + o_s[:, None] * sv + o_v[None, :],
                      mask=m_s[:, None] & (o_v[None, :] < V), other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
        m_vis = ((o_s[None, :] >= c_start[:, None]) & (o_s[None, :] <= o_p[:, None])
                 & m_s[None, :] & m_row[:, None])
        b_p = tl.where(m_vis, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(dq + o_i[:, None] * sdq + o_k[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_qk)


@triton.jit(do_not_specialize=SIZES)
def _local_bwd_dkdv(q, k, v, do, lse, delta, dk, dv, H, Tq, Tk, offset, C, scale_log2, scale,
                    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, BTHK: tl.constexpr):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    q, sq = token_rows(q, bh, H, Tq, K, BTHK)
    k, sk = token_rows(k, bh, H, Tk, K, BTHK)
    dk, sdk = token_rows(dk, bh, H, Tk, K, BTHK)
    v, sv = token_rows(v, bh, H, Tk, V, BTHK)
    dv, sdv = token_rows(dv, bh, H, Tk, V, BTHK)
    do, sdo = token_rows(do, bh, H, Tq, V, BTHK)
    lse += bh * Tq
    delta += bh * Tq
    o_s = i_s * BS + tl.arange(0, BS)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_s = o_s < Tk
    m_sk = m_s[:, None] & (o_k[None, :] < K)
    m_sv = m_s[:, None] & (o_v[None, :] < V)
    b_k = tl.load(k + o_s[:, None] * sk + o_k[None, :], mask=m_sk, other=0.)
    b_v = tl.load(v + o_s[:, None] * sv + o_v[None, :], mask=m_sv, other=0.)
    c_key = o_s // C
    b_dk = tl.zeros([BS, BK], tl.float32)
    b_dv = tl.zeros([BS, BV], tl.float32)
    # Rows that see this key tile: from its first key to the end of its last key's chunk.
    lo = tl.maximum(i_s * BS, offset)
    hi = tl.minimum(((i_s * BS + BS - 1) // C + 1) * C, Tk)
    for p0 in range(lo, hi, BT):
        o_p = p0 + tl.arange(0, BT)
        m_row = o_p < hi
        o_i = o_p - offset
        b_q = tl.load(q + o_i[:, None] * sq + o_k[None, :],
                      mask=m_row[:, None] & (o_k[None, :] < K), other=0.)
        b_do = tl.load(do + o_i[:, None] * sdo + o_v[None, :],
                       mask=m_row[:, None] & (o_v[None, :] < V), other=0.)
        b_lse = tl.load(lse + o_i, mask=m_row, other=0.)
        b_delta = tl.load(delta + o_i, mask=m_row, other=0.)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * scale_log2       # [BS, BT]
        m_vis = ((o_p[None, :] >= o_s[:, None]) & ((o_p[None, :] // C) == c_key[:, None])
                 & m_row[None, :] & m_s[:, None])
        b_pt = tl.where(m_vis, tl.exp2(b_st - b_lse[None, :]), 0.)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    tl.store(dk + o_s[:, None] * sdk + o_k[None, :], (b_dk * scale).to(dk.dtype.element_ty),
             mask=m_sk)
    tl.store(dv + o_s[:, None] * sdv + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_sv)


def _query_tiles(Tk, offset, BT):
    """Row tiles from the one holding the first query (position offset) to the end."""
    return triton.cdiv(Tk, BT) - offset // BT


def _launch_meta(q, v, C, launch: LocalLaunch, bthk):
    """Row and key tiles of min(launch.block, padded C); whole K and V per tile."""
    K, V = q.shape[-1], v.shape[-1]
    BT = pow2_tile(C, launch.block)
    return dict(K=K, V=V, BT=BT, BS=BT, BK=pow2_tile(K, TRITON_MAX_HEAD_DIM),
                BV=pow2_tile(V, TRITON_MAX_HEAD_DIM), PREC=dot_precision(q.dtype),
                BTHK=bthk, num_warps=launch.warps)


class ChunkLocalAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, chunk_size, offset, scale, launch, bthk):
        q, k, v = (stored_as(t, bthk) for t in (q, k, v))
        B, H, Tq, K = q.shape
        Tk = k.shape[2]
        meta = _launch_meta(q, v, chunk_size, launch, bthk)
        o = empty_as(B, H, Tq, v.shape[-1], bthk, dtype=v.dtype, device=q.device)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        grid = (_query_tiles(Tk, offset, meta["BT"]), B * H)
        _local_fwd[grid](q, k, v, o, lse, H, Tq, Tk, offset, chunk_size, scale * LOG2E, **meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (chunk_size, offset, scale, launch, bthk)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        chunk_size, offset, scale, launch, bthk = ctx.args
        do = stored_as(do, bthk)
        B, H, Tq, K = q.shape
        Tk = k.shape[2]
        meta = _launch_meta(q, v, chunk_size, launch, bthk)
        delta = (o.float() * do.float()).sum(-1).contiguous()
        dq, dk, dv = (empty_as(*t.shape, bthk, dtype=t.dtype, device=t.device) for t in (q, k, v))
        _local_bwd_dq[(_query_tiles(Tk, offset, meta["BT"]), B * H)](
            q, k, v, do, lse, delta, dq, H, Tq, Tk, offset, chunk_size, scale * LOG2E, scale,
            **meta)
        _local_bwd_dkdv[(triton.cdiv(Tk, meta["BS"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, H, Tq, Tk, offset, chunk_size, scale * LOG2E, scale,
            **meta)
        return dq, dk, dv, None, None, None, None, None


def chunk_local_attention_triton(q, k, v, *, chunk_size, offset=0, scale=None,
                                 launch: LocalLaunch = LocalLaunch(), bthk=False):
    """Inputs as `kernels.bsbr.chunk_local_attention` (validated there) as [B,H,T,·] views,
    stored token-major when ``bthk`` (layout.py); K, V <= 256. The output lies in the same
    layout."""
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{name}: the Triton backend takes head dims up to "
                             f"{TRITON_MAX_HEAD_DIM}, got {t.shape[-1]} (use backend='torch')")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.shape[2] == 0:
        return v.new_empty(*q.shape[:3], v.shape[-1])
    return ChunkLocalAttentionTriton.apply(q, k, v, chunk_size, offset, scale, launch, bthk)

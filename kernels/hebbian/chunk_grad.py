"""Chunked Hebbian attention in Triton, the gradient stages that need no sequential pass:
dA (the masked dO Vᵀ), dq and dk, dv. The reverse state pass (bwd_dh) is in chunk_state.py,
with the notation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_precision
from .common import (LENGTH_ARGS, _causal_weights, _chunk_span, _key_decay, _query_decay, _row,
                     _row_offset, _warps, bhtd, or_placeholder as _or)


# --------------------------------------------------------------------------------------------
# Stage 4 (backward): dA_c = scale · D ⊙ (dO_c V_cᵀ), float32 [B·H, NTS, BT, BT]. grid (NTS, B·H).
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_bwd_dA_kernel(v, do, dA, log2g, chunks, scale, T, t0, NTS, H, HV, V,
                                BT: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                IS_VARLEN: tl.constexpr, BTHK: tl.constexpr,
                                PREC: tl.constexpr):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = tl.arange(0, BT)
    t_s, T_end = _chunk_span(chunks, i_t, T, t0, BT, IS_VARLEN)
    m_t = o_i < T_end - t_s
    p_v, s_v = _row(v, i_b, i_h % HV, HV, T, V, BTHK)
    p_do, s_do = _row(do, i_b, i_h, H, T, V, BTHK)
    p_v += t_s * s_v
    p_do += t_s * s_do
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(p_do + (o_i[:, None] * s_do + o_v[None, :]),
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        b_vt = tl.load(p_v + (o_i[None, :] * s_v + o_v[:, None]),
                       mask=m_v[:, None] & m_t[None, :], other=0.)
        b_dA += tl.dot(b_do, b_vt, input_precision=PREC)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    m_A, b_D = _causal_weights(o_i[:, None], o_i[None, :], b_lg, STRICT)
    if HAS_DECAY:
        b_dA *= b_D
    b_dA = tl.where(m_A, b_dA * scale, 0.)
    p_dA = dA + (i_bh * NTS + i_t) * BT * BT
    tl.store(p_dA + o_i[:, None] * BT + o_i[None, :], b_dA)



# --------------------------------------------------------------------------------------------
# Stage 5 (backward): dq, dk. grid (cdiv(K, BK), NTS, B·H); loops over V tiles.
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_bwd_dqk_kernel(q, k, v, h, do, dh, dA, dq, dk, log2g, chunks, scale, T, t0,
                                 NTS, H, HV, K, V,
                                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                 IS_VARLEN: tl.constexpr, BTHK: tl.constexpr,
                                 PREC: tl.constexpr):
    i_k, i_t = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = tl.arange(0, BT)
    t_s, T_end = _chunk_span(chunks, i_t, T, t0, BT, IS_VARLEN)
    m_t = o_i < T_end - t_s
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_v, s_v = _row(v, i_b, i_h % HV, HV, T, V, BTHK)
    p_do, s_do = _row(do, i_b, i_h, H, T, V, BTHK)
    p_v += t_s * s_v
    p_do += t_s * s_do
    p_h = h + (i_bh * NTS + i_t) * K * V
    p_dh = dh + (i_bh * NTS + i_t) * K * V
    o_kv = o_k[None, :] * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        b_do = tl.load(p_do + (o_i[:, None] * s_do + o_v[None, :]), mask=m_tv, other=0.)
        b_v = tl.load(p_v + (o_i[:, None] * s_v + o_v[None, :]), mask=m_tv, other=0.)
        b_ht = tl.load(p_h + (o_kv + o_v[:, None]), mask=m_vk, other=0.)        # h_cᵀ [BV, BK]
        b_dht = tl.load(p_dh + (o_kv + o_v[:, None]), mask=m_vk, other=0.)     # dh_{c+1}ᵀ
        b_dq += tl.dot(b_do, b_ht, input_precision=PREC)
        b_dk += tl.dot(b_v, b_dht, input_precision=PREC)

    # q, k, dq, dk share one layout and shape: one row pointer offset and one tile of offsets.
    o_tk, s_q = _row_offset(i_b, i_h, H, T, K, BTHK)
    o_tk += t_s * s_q
    o_ik = o_i[:, None] * s_q + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load((q + o_tk) + o_ik, mask=m_tk, other=0.)
    b_k = tl.load((k + o_tk) + o_ik, mask=m_tk, other=0.)
    p_dA = dA + (i_bh * NTS + i_t) * BT * BT
    b_dA = tl.load(p_dA + o_i[:, None] * BT + o_i[None, :]).to(b_k.dtype)
    b_dAt = tl.load(p_dA + o_i[None, :] * BT + o_i[:, None]).to(b_k.dtype)
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
        L = tl.minimum(T_end - t_s, BT)
        b_dq *= _query_decay(o_i, b_lg, STRICT)[:, None]
        b_dk *= _key_decay(o_i, m_t, L, b_lg)[:, None]
    b_dq = b_dq * scale + tl.dot(b_dA, b_k, input_precision=PREC)
    b_dk += tl.dot(b_dAt, b_q, input_precision=PREC)
    tl.store((dq + o_tk) + o_ik, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store((dk + o_tk) + o_ik, b_dk.to(dk.dtype.element_ty), mask=m_tk)



# --------------------------------------------------------------------------------------------
# Stage 6 (backward): dv. grid (cdiv(V, BV), NTS, B·H); loops over K tiles. Writes dv per head
# to a buffer in the inputs' layout whose time axis (TDV tokens) starts at t_dv (0: the full
# tensor; a segment's first token: a segment buffer).
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_bwd_dv_kernel(q, k, do, dh, dv, log2g, chunks, scale, T, t0, NTS, TDV, t_dv,
                                H, K, V,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                IS_VARLEN: tl.constexpr, BTHK: tl.constexpr,
                                PREC: tl.constexpr):
    i_v, i_t = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = tl.arange(0, BT)
    t_s, T_end = _chunk_span(chunks, i_t, T, t0, BT, IS_VARLEN)
    m_t = o_i < T_end - t_s
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q, s_q = _row(q, i_b, i_h, H, T, K, BTHK)
    p_k, _ = _row(k, i_b, i_h, H, T, K, BTHK)
    p_q += t_s * s_q
    p_k += t_s * s_q
    o_tk = o_i * s_q
    p_dh = dh + (i_bh * NTS + i_t) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)          # At[j, i] = k_j · q_i
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = tl.load(p_k + (o_tk[:, None] + o_k[None, :]), mask=m_t[:, None] & m_k[None, :],
                      other=0.)
        b_qt = tl.load(p_q + (o_tk[None, :] + o_k[:, None]), mask=m_k[:, None] & m_t[None, :],
                       other=0.)
        b_dh = tl.load(p_dh + o_k[:, None] * V + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dv += tl.dot(b_k, b_dh, input_precision=PREC)
        b_At += tl.dot(b_k, b_qt, input_precision=PREC)

    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    # The transposed tile: rows are keys j, columns queries i.
    m_A, b_D = _causal_weights(o_i[None, :], o_i[:, None], b_lg, STRICT)
    if HAS_DECAY:
        L = tl.minimum(T_end - t_s, BT)
        b_dv *= _key_decay(o_i, m_t, L, b_lg)[:, None]
        b_At *= b_D
    b_At = tl.where(m_A, b_At * scale, 0.)
    p_do, s_do = _row(do, i_b, i_h, H, T, V, BTHK)
    b_do = tl.load(p_do + t_s * s_do + (o_i[:, None] * s_do + o_v[None, :]),
                   mask=m_t[:, None] & m_v[None, :], other=0.)
    b_dv += tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
    p_dv, s_dv = _row(dv, i_b, i_h, H, TDV, V, BTHK)
    tl.store(p_dv + (t_s - t_dv) * s_dv + (o_i[:, None] * s_dv + o_v[None, :]),
             b_dv.to(p_dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])



# --------------------------------------------------------------------------------------------
# Launchers. ``seg`` (schedule.Segment) says which chunks; ``bthk`` the layout.
# --------------------------------------------------------------------------------------------
def chunk_bwd_dA(v, do, log2g, scale, strict, *, seg, tiles, bthk=False):
    B, H, T, V = bhtd(do, bthk)
    HV = bhtd(v, bthk)[1]
    BT = tiles.BT
    dA = torch.empty(B * H, seg.nts, BT, BT, dtype=torch.float32, device=do.device)
    chunk_hebbian_bwd_dA_kernel[(seg.nts, B * H)](
        v, do, dA, _or(log2g, do), _or(seg.chunks, do), float(scale), T, seg.t0, seg.nts, H,
        HV, V, BT=BT, BV=tiles.dA_BV, HAS_DECAY=log2g is not None, STRICT=strict,
        IS_VARLEN=seg.chunks is not None, BTHK=bthk, PREC=dot_precision(do.dtype),
        num_warps=4, num_stages=2)
    return dA


def chunk_bwd_dqk(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, strict, *, seg, tiles,
                  bthk=False):
    B, H, T, K = bhtd(q, bthk)
    HV, V = bhtd(v, bthk)[1], v.shape[3]
    BK, BV = tiles.dqk_BK, tiles.dqk_BV
    grid = (triton.cdiv(K, BK), seg.nts, B * H)
    chunk_hebbian_bwd_dqk_kernel[grid](
        q, k, v, h, do, dh, dA, dq, dk, _or(log2g, q), _or(seg.chunks, q), float(scale),
        T, seg.t0, seg.nts, H, HV, K, V, BT=tiles.BT, BK=BK, BV=BV,
        HAS_DECAY=log2g is not None, STRICT=strict, IS_VARLEN=seg.chunks is not None,
        BTHK=bthk, PREC=dot_precision(q.dtype), num_warps=_warps(tiles.BT, BK), num_stages=2)


def chunk_bwd_dv(q, k, do, dh, dv, log2g, scale, strict, *, seg, t_dv, tiles, bthk=False):
    """dv: per head, in the inputs' layout, whose time axis starts at token t_dv."""
    B, H, T, K = bhtd(q, bthk)
    V = do.shape[3]
    BK, BV = tiles.o_BK, tiles.o_BV
    grid = (triton.cdiv(V, BV), seg.nts, B * H)
    chunk_hebbian_bwd_dv_kernel[grid](
        q, k, do, dh, dv, _or(log2g, q), _or(seg.chunks, q), float(scale), T, seg.t0, seg.nts,
        bhtd(dv, bthk)[2], t_dv, H, K, V, BT=tiles.BT, BK=BK, BV=BV,
        HAS_DECAY=log2g is not None, STRICT=strict, IS_VARLEN=seg.chunks is not None,
        BTHK=bthk, PREC=dot_precision(q.dtype), num_warps=_warps(tiles.BT, BV), num_stages=2)

"""Chunked Hebbian attention in Triton, the gradient stages that need no sequential pass:
dA (the masked dO Vᵀ), dq and dk, dv. The reverse state pass (bwd_dh) is in chunk_state.py,
with the notation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_precision
from .common import _causal_weights, _key_decay, _query_decay, _warps


# --------------------------------------------------------------------------------------------
# Stage 4 (backward): dA_c = scale · D ⊙ (dO_c V_cᵀ), float32 [B·H, NTS, BT, BT]. grid (NTS, B·H).
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_bwd_dA_kernel(v, do, dA, log2g, scale, T, t0, NTS, H, HV, V,
                                BT: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                PREC: tl.constexpr):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = tl.arange(0, BT)
    t_s = (t0 + i_t * BT).to(tl.int64)
    m_t = o_i < T - t_s
    o_tv = o_i * V
    p_v = v + ((i_b * HV + i_h % HV) * T + t_s) * V
    p_do = do + (i_bh * T + t_s) * V
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(p_do + (o_tv[:, None] + o_v[None, :]), mask=m_t[:, None] & m_v[None, :],
                       other=0.)
        b_vt = tl.load(p_v + (o_tv[None, :] + o_v[:, None]), mask=m_v[:, None] & m_t[None, :],
                       other=0.)
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
@triton.jit
def chunk_hebbian_bwd_dqk_kernel(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, T, t0, NTS, H,
                                 HV, K, V,
                                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                 HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                 PREC: tl.constexpr):
    i_k, i_t = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = tl.arange(0, BT)
    t_s = (t0 + i_t * BT).to(tl.int64)
    m_t = o_i < T - t_s
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_tv = o_i * V
    p_v = v + ((i_b * HV + i_h % HV) * T + t_s) * V
    p_do = do + (i_bh * T + t_s) * V
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
        b_do = tl.load(p_do + (o_tv[:, None] + o_v[None, :]), mask=m_tv, other=0.)
        b_v = tl.load(p_v + (o_tv[:, None] + o_v[None, :]), mask=m_tv, other=0.)
        b_ht = tl.load(p_h + (o_kv + o_v[:, None]), mask=m_vk, other=0.)        # h_cᵀ [BV, BK]
        b_dht = tl.load(p_dh + (o_kv + o_v[:, None]), mask=m_vk, other=0.)     # dh_{c+1}ᵀ
        b_dq += tl.dot(b_do, b_ht, input_precision=PREC)
        b_dk += tl.dot(b_v, b_dht, input_precision=PREC)

    o_tk = (i_bh * T + t_s) * K
    o_ik = o_i[:, None] * K + o_k[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    b_q = tl.load((q + o_tk) + o_ik, mask=m_tk, other=0.)
    b_k = tl.load((k + o_tk) + o_ik, mask=m_tk, other=0.)
    p_dA = dA + (i_bh * NTS + i_t) * BT * BT
    b_dA = tl.load(p_dA + o_i[:, None] * BT + o_i[None, :]).to(b_k.dtype)
    b_dAt = tl.load(p_dA + o_i[None, :] * BT + o_i[:, None]).to(b_k.dtype)
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
        L = tl.minimum(T - t_s, BT)
        b_dq *= _query_decay(o_i, b_lg, STRICT)[:, None]
        b_dk *= _key_decay(o_i, m_t, L, b_lg)[:, None]
    b_dq = b_dq * scale + tl.dot(b_dA, b_k, input_precision=PREC)
    b_dk += tl.dot(b_dAt, b_q, input_precision=PREC)
    tl.store((dq + o_tk) + o_ik, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store((dk + o_tk) + o_ik, b_dk.to(dk.dtype.element_ty), mask=m_tk)



# --------------------------------------------------------------------------------------------
# Stage 6 (backward): dv. grid (cdiv(V, BV), NTS, B·H); loops over K tiles. Writes dv per head
# to a buffer whose time axis starts at t_dv (0: the full tensor; t0: a segment buffer).
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_bwd_dv_kernel(q, k, do, dh, dv, log2g, scale, T, t0, NTS, TDV, t_dv, H, K, V,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                PREC: tl.constexpr):
    i_v, i_t = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_h = i_bh % H
    o_i = tl.arange(0, BT)
    t_s = (t0 + i_t * BT).to(tl.int64)
    m_t = o_i < T - t_s
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_tk = o_i * K
    p_q = q + (i_bh * T + t_s) * K
    p_k = k + (i_bh * T + t_s) * K
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
        L = tl.minimum(T - t_s, BT)
        b_dv *= _key_decay(o_i, m_t, L, b_lg)[:, None]
        b_At *= b_D
    b_At = tl.where(m_A, b_At * scale, 0.)
    p_do = do + (i_bh * T + t_s) * V
    b_do = tl.load(p_do + o_i[:, None] * V + o_v[None, :],
                   mask=m_t[:, None] & m_v[None, :], other=0.)
    b_dv += tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
    p_dv = dv + (i_bh * TDV + t_s - t_dv) * V
    tl.store(p_dv + o_i[:, None] * V + o_v[None, :],
             b_dv.to(p_dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])



# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def chunk_bwd_dA(v, do, log2g, scale, strict, *, t0, nts, tiles):
    B, H, T, V = do.shape
    HV = v.shape[1]
    BT = tiles.BT
    dA = torch.empty(B * H, nts, BT, BT, dtype=torch.float32, device=do.device)
    chunk_hebbian_bwd_dA_kernel[(nts, B * H)](
        v, do, dA, log2g if log2g is not None else do, float(scale), T, t0, nts, H, HV, V,
        BT=BT, BV=tiles.dA_BV, HAS_DECAY=log2g is not None, STRICT=strict,
        PREC=dot_precision(do.dtype), num_warps=4, num_stages=2)
    return dA


def chunk_bwd_dqk(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, strict, *, t0, nts, tiles):
    B, H, T, K = q.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.dqk_BK, tiles.dqk_BV
    grid = (triton.cdiv(K, BK), nts, B * H)
    chunk_hebbian_bwd_dqk_kernel[grid](
        q, k, v, h, do, dh, dA, dq, dk, log2g if log2g is not None else q, float(scale),
        T, t0, nts, H, HV, K, V, BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None,
        STRICT=strict, PREC=dot_precision(q.dtype), num_warps=_warps(tiles.BT, BK),
        num_stages=2)


def chunk_bwd_dv(q, k, do, dh, dv, log2g, scale, strict, *, t0, nts, t_dv, tiles):
    """dv: [B,H,TDV,V] whose time axis starts at global position t_dv."""
    B, H, T, K = q.shape
    V = do.shape[3]
    BK, BV = tiles.o_BK, tiles.o_BV
    grid = (triton.cdiv(V, BV), nts, B * H)
    chunk_hebbian_bwd_dv_kernel[grid](
        q, k, do, dh, dv, log2g if log2g is not None else q, float(scale), T, t0, nts,
        dv.shape[2], t_dv, H, K, V, BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None,
        STRICT=strict, PREC=dot_precision(q.dtype), num_warps=_warps(tiles.BT, BV),
        num_stages=2)

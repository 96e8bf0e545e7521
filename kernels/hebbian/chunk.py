"""Chunked Hebbian attention in Triton: one kernel per stage of the chunked algorithm.

Notation (DESIGN.md, "Math: Hebbian attention"). The sequence is cut into chunks of BT tokens;
h_c ∈ R^{K×V} is the state *before* chunk c, L the chunk's length (BT, or less for the last),
i, j ∈ [0, L) local positions and γ the per-head decay (1 when off). With the decay powers

    w_in_i = γ^i (strict) | γ^{i+1} (inclusive)           on the query, for the inter-chunk term
    D_ij   = γ^{i-1-j}, j < i (strict) | γ^{i-j}, j ≤ i   the masked intra-chunk weights
    w_k_j  = γ^{L-1-j}                                    on the key, for the state update

the stages are

    fwd_h   (state passing)   h_{c+1} = γ^L h_c + (w_k ⊙ K_c)ᵀ V_c                   sequential in c
    fwd_o   (output)          O_c = scale · (w_in ⊙ Q_c h_c + (D ⊙ Q_c K_cᵀ) V_c)
    bwd_dh  (reverse passing) dh_c = γ^L dh_{c+1} + scale · (w_in ⊙ Q_c)ᵀ dO_c        sequential in c
    bwd_dA                    dA_c = scale · D ⊙ (dO_c V_cᵀ)
    bwd_dqk                   dQ_c = scale · w_in ⊙ dO_c h_cᵀ + dA_c K_c
                              dK_c = w_k ⊙ V_c dh_{c+1}ᵀ + dA_cᵀ Q_c
    bwd_dv                    dV_c = scale · (D ⊙ Q_c K_cᵀ)ᵀ dO_c + w_k ⊙ K_c dh_{c+1}

The state kernels keep their [BK, BV] tile of the state in float32 registers and walk the chunks
of one *segment* of the sequence (chunks t0/BT .. t0/BT + NTS - 1), writing each chunk's state in
the input dtype to a buffer indexed by the chunk's place in the segment. The caller
(function.py) walks segments so that buffer stays bounded at any sequence length.

Layouts: q, k [B,H,T,K] and do, o [B,H,T,V] contiguous; v [B,HV,T,V] contiguous with HV = H, or
HV = 1 when one v is shared by all heads (read by head index i_h % HV: never copied). States
[B·H, K, V] float32; per-chunk buffers [B·H, NTS, K, V]. Addresses: B·H·T·K passes 2^31 at the
BDH shapes, so each tile's start (batch·head, chunk) is folded into the base pointer in int64,
and only the in-tile offsets (< BT·K or K·V, far under 2^31) stay int32: int64 offset tensors
per element would double the address registers and spill. γ arrives as log2 γ (float32) and γ^n = exp2(n · log2 γ).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs: exact float32 products (tf32 would cost ~3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _decay_pow(n, b_lg):
    """γ^n for a tensor n of (non-negative) exponents, from log2 γ."""
    return tl.exp2(n.to(tl.float32) * b_lg)


@triton.jit
def _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T, t_s, b_lg, BT: tl.constexpr,
                        HAS_DECAY: tl.constexpr, PREC: tl.constexpr):
    """h_{c+1} = γ^L h_c + (w_k ⊙ K_c)ᵀ V_c for the chunk starting at t_s (L tokens of it are
    before T); b_kt [BK, BT] is K_cᵀ, b_v [BT, BV] is V_c, b_lg = log2 γ (unused without decay)."""
    if HAS_DECAY:
        L = tl.minimum(T - t_s, BT)
        b_wk = tl.where(m_t, _decay_pow(tl.maximum(L - 1 - o_i, 0), b_lg), 0.)
        b_kt = (b_kt * b_wk[None, :]).to(b_v.dtype)
        b_h *= tl.exp2(L.to(tl.float32) * b_lg)
    return b_h + tl.dot(b_kt, b_v, input_precision=PREC)


# --------------------------------------------------------------------------------------------
# Stage 1: state passing. grid (cdiv(K, BK), cdiv(V, BV), B·H); sequential over the segment.
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_fwd_h_kernel(k, v, h, h0, ht, log2g, T, t0, NTS, H, HV, K, V,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                               HAS_DECAY: tl.constexpr, USE_H0: tl.constexpr,
                               STORE_H: tl.constexpr, STORE_HT: tl.constexpr,
                               PREC: tl.constexpr):
    i_k, i_v = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_k = k + i_bh * T * K
    p_v = v + (i_b * HV + i_h % HV) * T * V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_kv, mask=m_kv, other=0.)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    for i_t in range(NTS):
        t_s = t0 + i_t * BT
        if STORE_H:
            p_h = h + (i_bh * NTS + i_t) * K * V
            tl.store(p_h + o_kv, b_h.to(p_h.dtype.element_ty), mask=m_kv)
        m_t = o_i < T - t_s
        # K_cᵀ tile [BK, BT] and V_c tile [BT, BV]; rows past T load as 0. The chunk's start
        # goes into the (int64) base pointer; in-tile offsets stay small int32.
        b_kt = tl.load(p_k + t_s.to(tl.int64) * K + (o_i[None, :] * K + o_k[:, None]),
                       mask=m_k[:, None] & m_t[None, :], other=0.)
        b_v = tl.load(p_v + t_s.to(tl.int64) * V + (o_i[:, None] * V + o_v[None, :]),
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        b_h = _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T, t_s, b_lg, BT, HAS_DECAY, PREC)
    if STORE_HT:
        tl.store(ht + i_bh * K * V + o_kv, b_h, mask=m_kv)


# --------------------------------------------------------------------------------------------
# Stage 2: output. grid (cdiv(V, BV), NTS, B·H); loops over K tiles.
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_fwd_o_kernel(q, k, v, h, o, log2g, scale, T, t0, NTS, H, HV, K, V,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                               HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                               PREC: tl.constexpr):
    i_v, i_t = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = tl.arange(0, BT)
    t_s = (t0 + i_t * BT).to(tl.int64)
    m_t = o_i < T - t_s
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q = q + (i_bh * T + t_s) * K
    p_k = k + (i_bh * T + t_s) * K
    p_h = h + (i_bh * NTS + i_t) * K * V
    o_tk = o_i * K

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(p_q + (o_tk[:, None] + o_k[None, :]), mask=m_t[:, None] & m_k[None, :],
                      other=0.)
        b_kt = tl.load(p_k + (o_tk[None, :] + o_k[:, None]), mask=m_k[:, None] & m_t[None, :],
                       other=0.)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.)
        b_o += tl.dot(b_q, b_h, input_precision=PREC)
        b_A += tl.dot(b_q, b_kt, input_precision=PREC)

    if STRICT:
        m_A = o_i[:, None] > o_i[None, :]
    else:
        m_A = o_i[:, None] >= o_i[None, :]
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
        shift = 1 if STRICT else 0
        b_o *= _decay_pow(o_i + (1 - shift), b_lg)[:, None]
        b_A *= _decay_pow(tl.where(m_A, o_i[:, None] - o_i[None, :] - shift, 0), b_lg)
    b_A = tl.where(m_A, b_A, 0.)
    p_v = v + ((i_b * HV + i_h % HV) * T + t_s) * V
    b_v = tl.load(p_v + o_i[:, None] * V + o_v[None, :],
                  mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    p_o = o + (i_bh * T + t_s) * V
    tl.store(p_o + o_i[:, None] * V + o_v[None, :],
             (b_o * scale).to(p_o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


# --------------------------------------------------------------------------------------------
# Forward, fused (the alternative to fwd_h + fwd_o). grid (cdiv(V, BV), cdiv(K, BK), B·H).
# Each program keeps its [BK, BV] slice of the state in float32 registers and walks the chunks
# in order, adding that slice's share of every chunk's output,
#     O_c[:, v-tile] += scale · (w_in ⊙ Q_c[:, k-tile] h_c[k-tile, v-tile]
#                               + (D ⊙ Q_c[:, k-tile] K_c[:, k-tile]ᵀ) V_c[:, v-tile]),
# which is exact because both terms are sums over K (the mask D is applied per K slice). The
# per-chunk states are never written to memory: the cost moves to the cross-K-tile sum of O,
# done with float32 atomics into a buffer that fits in L2 (ATOMIC), or with plain stores when
# one K tile covers K. Programs that differ only in the V tile are adjacent in the grid, so
# they read the same Q_c, K_c tiles at about the same time (from L2 after the first).
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_fwd_fused_kernel(q, k, v, o, h0, ht, log2g, scale, T, t0, NTS, H, HV, K, V,
                                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                   HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                   USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                                   ATOMIC: tl.constexpr, PREC: tl.constexpr):
    i_v, i_k = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_q = q + i_bh * T * K
    p_k = k + i_bh * T * K
    p_v = v + (i_b * HV + i_h % HV) * T * V
    p_o = o + i_bh * T * V
    if STRICT:
        m_A = o_i[:, None] > o_i[None, :]
    else:
        m_A = o_i[:, None] >= o_i[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_kv, mask=m_kv, other=0.)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
        shift = 1 if STRICT else 0
        b_win = _decay_pow(o_i + (1 - shift), b_lg)
        b_D = _decay_pow(tl.where(m_A, o_i[:, None] - o_i[None, :] - shift, 0), b_lg)
    # Q and K tiles share one int32 offset tile, V and O another; the chunk's start moves the
    # (int64) base pointers. K is loaded row-major like Q and transposed in registers.
    o_tk = o_i[:, None] * K + o_k[None, :]
    o_tv = o_i[:, None] * V + o_v[None, :]
    for i_t in range(NTS):
        t_s = t0 + i_t * BT
        m_t = o_i < T - t_s
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load((p_q + t_s.to(tl.int64) * K) + o_tk, mask=m_tk, other=0.)
        b_kt = tl.trans(tl.load((p_k + t_s.to(tl.int64) * K) + o_tk, mask=m_tk, other=0.))
        b_v = tl.load((p_v + t_s.to(tl.int64) * V) + o_tv, mask=m_tv, other=0.)
        b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
        b_A = tl.dot(b_q, b_kt, input_precision=PREC)
        if HAS_DECAY:
            b_o *= b_win[:, None]
            b_A *= b_D
        b_A = tl.where(m_A, b_A, 0.)
        b_o = (b_o + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)) * scale
        p_ot = (p_o + t_s.to(tl.int64) * V) + o_tv
        if ATOMIC:
            tl.atomic_add(p_ot, b_o, mask=m_tv, sem="relaxed")
        else:
            tl.store(p_ot, b_o.to(p_o.dtype.element_ty), mask=m_tv)
        b_h = _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T, t_s, b_lg, BT, HAS_DECAY, PREC)
    if STORE_HT:
        tl.store(ht + i_bh * K * V + o_kv, b_h, mask=m_kv)


# --------------------------------------------------------------------------------------------
# Stage 3 (backward): reverse state passing. grid (cdiv(K, BK), cdiv(V, BV), B·H).
# Writes dh[c] = dL/d(state after chunk c) for the segment's chunks, and the carry dL/dh_first.
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_bwd_dh_kernel(q, do, dh, dht, dh0, log2g, scale, T, t0, NTS, H, K, V,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                USE_DHT: tl.constexpr, PREC: tl.constexpr):
    i_k, i_v = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_h = i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_q = q + i_bh * T * K
    p_do = do + i_bh * T * V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(dht + i_bh * K * V + o_kv, mask=m_kv, other=0.)
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    for i_r in range(NTS):
        i_t = NTS - 1 - i_r
        t_s = t0 + i_t * BT
        p_dh = dh + (i_bh * NTS + i_t) * K * V
        tl.store(p_dh + o_kv, b_dh.to(p_dh.dtype.element_ty), mask=m_kv)
        m_t = o_i < T - t_s
        b_qt = tl.load(p_q + t_s.to(tl.int64) * K + (o_i[None, :] * K + o_k[:, None]),
                       mask=m_k[:, None] & m_t[None, :], other=0.)
        b_do = tl.load(p_do + t_s.to(tl.int64) * V + (o_i[:, None] * V + o_v[None, :]),
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        if HAS_DECAY:
            L = tl.minimum(T - t_s, BT)
            shift = 1 if STRICT else 0
            b_qt = (b_qt * _decay_pow(o_i + (1 - shift), b_lg)[None, :]).to(b_do.dtype)
            b_dh *= tl.exp2(L.to(tl.float32) * b_lg)
        b_dh += scale * tl.dot(b_qt, b_do, input_precision=PREC)
    tl.store(dh0 + i_bh * K * V + o_kv, b_dh, mask=m_kv)


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
    if STRICT:
        m_A = o_i[:, None] > o_i[None, :]
    else:
        m_A = o_i[:, None] >= o_i[None, :]
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
        shift = 1 if STRICT else 0
        b_dA *= _decay_pow(tl.where(m_A, o_i[:, None] - o_i[None, :] - shift, 0), b_lg)
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
        shift = 1 if STRICT else 0
        L = tl.minimum(T - t_s, BT)
        b_dq *= _decay_pow(o_i + (1 - shift), b_lg)[:, None]
        b_dk *= tl.where(m_t, _decay_pow(tl.maximum(L - 1 - o_i, 0), b_lg), 0.)[:, None]
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

    if STRICT:
        m_A = o_i[None, :] > o_i[:, None]
    else:
        m_A = o_i[None, :] >= o_i[:, None]
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
        shift = 1 if STRICT else 0
        L = tl.minimum(T - t_s, BT)
        b_dv *= tl.where(m_t, _decay_pow(tl.maximum(L - 1 - o_i, 0), b_lg), 0.)[:, None]
        b_At *= _decay_pow(tl.where(m_A, o_i[None, :] - o_i[:, None] - shift, 0), b_lg)
    b_At = tl.where(m_A, b_At * scale, 0.)
    p_do = do + (i_bh * T + t_s) * V
    b_do = tl.load(p_do + o_i[:, None] * V + o_v[None, :],
                   mask=m_t[:, None] & m_v[None, :], other=0.)
    b_dv += tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
    p_dv = dv + (i_bh * TDV + t_s - t_dv) * V
    tl.store(p_dv + o_i[:, None] * V + o_v[None, :],
             b_dv.to(p_dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


# --------------------------------------------------------------------------------------------
# Launchers. Tile sizes: BK/BV at least 16 (tl.dot's minimum), at most the padded dimension.
# --------------------------------------------------------------------------------------------
def _tile(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _warps(*tiles: int) -> int:
    """4 warps up to 64×64-ish float32 accumulators, 8 above (keeps registers under the cap)."""
    return 4 if INTERPRET or max(tiles) * sorted(tiles)[-2] <= 128 * 64 else 8


# Benchmarks may pin tile sizes here (e.g. {"o_BV": 64}, {"fused_warps": 16}); empty normally.
TILE_OVERRIDES: dict = {}
# The forward's algorithm: "split" (fwd_h writes every chunk's state, fwd_o reads them),
# "fused" (chunk_hebbian_fwd_fused_kernel: no per-chunk states in memory) or "auto" (`plan`).
# The environment variable GLASSBRAIN_FWD_MODE sets it (benchmarks compare them end to end).
FWD_MODE = os.environ.get("GLASSBRAIN_FWD_MODE", "auto")
if FWD_MODE not in ("auto", "split", "fused"):
    raise ValueError(f"GLASSBRAIN_FWD_MODE: expected 'auto', 'split' or 'fused', "
                     f"got {FWD_MODE!r}")
FUSED_MIN_PROGRAMS = 256      # ~2 per SM on an H100: fewer and the fused forward idles SMs


def plan(B: int, H: int, K: int, V: int, chunk_size: int | None):
    """(fused forward?, forward chunk, backward chunk) for a call; an explicit chunk_size
    fixes both chunks. The rule follows the H100 sweep (BENCHMARKS.md, bench_kernels --sweep):
      * fused forward (128×64 state slices, chunk 64) where it won: wide keys, whose float32
        output buffer is small next to Q and K (BDH: K = 32·V; 0.73 vs 0.91 ms split), and
        K ≤ 128, where no atomics are needed, given ≥ FUSED_MIN_PROGRAMS programs (B8 H16
        K=V=128: 0.216 vs 0.431 ms); otherwise the split forward at chunk 128 (B4 H8 K=V=256:
        0.316 vs 0.345 fused; B2 H16 T16k K=V=128, 64 programs: 0.491 vs 0.508);
      * backward chunk 128 where K·V is large or the state kernels have few programs (BDH
        2.54 vs 3.04 ms; K=V=256 0.87 vs 0.96; B2 H16 1.54 vs 1.60), else 64 (B8 H16 K=V=128:
        1.36 vs 1.43)."""
    if INTERPRET:                       # tests choose their paths explicitly; keep chunk 64
        fused = FWD_MODE == "fused"
        bt = chunk_size or 64
        return fused, bt, bt
    state_programs = B * H * triton.cdiv(K, 128) * triton.cdiv(V, 64)
    if FWD_MODE != "auto":
        fused = FWD_MODE == "fused"
    elif K > 128:
        fused = K >= 8 * V
    else:
        fused = state_programs >= FUSED_MIN_PROGRAMS
    if chunk_size:
        return fused, chunk_size, chunk_size
    bwd = 128 if (K * V >= 256 * 256 or state_programs < FUSED_MIN_PROGRAMS) else 64
    return fused, (64 if fused else 128), bwd


class Tiles:
    """The tile sizes one call uses (chosen once per shape in function.py)."""

    def __init__(self, K: int, V: int, BT: int, fused: bool = False):
        big = not INTERPRET
        self.BT = BT
        # State kernels: one [BK, BV] float32 tile per program, B·H·(K/BK)·(V/BV) programs.
        self.h_BK = _tile(K, 128 if big else 64)
        self.h_BV = _tile(V, 64)
        # Output / dv kernels: [BT, BV] accumulator plus the [BT, BT] scores, loop over K.
        self.o_BK = _tile(K, 64)
        self.o_BV = _tile(V, (128 if BT <= 64 else 64) if big else 64)
        # dq/dk kernel: two [BT, BK] accumulators, loop over V in BV steps.
        self.dqk_BK = _tile(K, 64)
        self.dqk_BV = _tile(V, 64)
        # Fused forward: one [BK, BV] float32 state slice per program (32 KiB at 128×64; the
        # sweep's best: 128×128 spills registers, 64×64 doubles the atomics).
        self.fused_BK = _tile(K, 128 if big else 32)
        self.fused_BV = _tile(V, 64 if big else 32)
        self.fused = fused
        self.fused_warps = None                     # None: _warps(BK, BV)
        for name, value in TILE_OVERRIDES.items():
            if name == "fused_warps":
                setattr(self, name, value)
                continue
            setattr(self, name, _tile({"K": K, "V": V}[name[-1]], value))


def chunk_fwd_h(k, v, log2g, h0, *, t0, nts, tiles, store_h=True, ht=None):
    """States before each chunk of the segment [t0, t0 + nts·BT) → h [B·H, nts, K, V] in k's
    dtype; the state after the segment goes to ``ht`` (float32 [B,H,K,V]) when given."""
    B, H, T, K = k.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.h_BK, tiles.h_BV
    h = (torch.empty(B * H, nts, K, V, dtype=k.dtype, device=k.device) if store_h else None)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
    chunk_hebbian_fwd_h_kernel[grid](
        k, v, h if store_h else k, h0 if h0 is not None else k, ht if ht is not None else k,
        log2g if log2g is not None else k, T, t0, nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, USE_H0=h0 is not None,
        STORE_H=store_h, STORE_HT=ht is not None, PREC=_prec(k.dtype),
        num_warps=_warps(BK, BV), num_stages=2)
    return h


def chunk_fwd_o(q, k, v, h, o, log2g, scale, strict, *, t0, nts, tiles):
    B, H, T, K = q.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.o_BK, tiles.o_BV
    grid = (triton.cdiv(V, BV), nts, B * H)
    chunk_hebbian_fwd_o_kernel[grid](
        q, k, v, h, o, log2g if log2g is not None else q, float(scale), T, t0, nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        PREC=_prec(q.dtype), num_warps=_warps(tiles.BT, BV), num_stages=2)


def fused_needs_atomics(K: int, tiles) -> bool:
    """The fused forward sums O over K tiles with atomics unless one tile covers K."""
    return triton.cdiv(K, tiles.fused_BK) > 1


def chunk_fwd_fused(q, k, v, o, log2g, h0, ht, scale, strict, *, t0, nts, tiles):
    """The segment [t0, t0 + nts·BT) of the fused forward. ``o`` is float32 and zeroed when
    `fused_needs_atomics` (programs add into it), else the output itself; the state after the
    segment goes to ``ht`` (float32) when given."""
    B, H, T, K = q.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.fused_BK, tiles.fused_BV
    grid = (triton.cdiv(V, BV), triton.cdiv(K, BK), B * H)
    chunk_hebbian_fwd_fused_kernel[grid](
        q, k, v, o, h0 if h0 is not None else q, ht if ht is not None else q,
        log2g if log2g is not None else q, float(scale), T, t0, nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        USE_H0=h0 is not None, STORE_HT=ht is not None, ATOMIC=fused_needs_atomics(K, tiles),
        PREC=_prec(q.dtype), num_warps=tiles.fused_warps or _warps(BK, BV), num_stages=2)


def chunk_bwd_dh(q, do, log2g, dht, dh0, scale, strict, *, t0, nts, tiles):
    """dh [B·H, nts, K, V] (grad of the state after each chunk); the grad of the state before
    the segment goes to ``dh0`` (float32; may alias ``dht``: each program reads its tile first)."""
    B, H, T, K = q.shape
    V = do.shape[3]
    BK, BV = tiles.h_BK, tiles.h_BV
    dh = torch.empty(B * H, nts, K, V, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)
    chunk_hebbian_bwd_dh_kernel[grid](
        q, do, dh, dht if dht is not None else q, dh0, log2g if log2g is not None else q,
        float(scale), T, t0, nts, H, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        USE_DHT=dht is not None, PREC=_prec(q.dtype), num_warps=_warps(BK, BV), num_stages=2)
    return dh


def chunk_bwd_dA(v, do, log2g, scale, strict, *, t0, nts, tiles):
    B, H, T, V = do.shape
    HV = v.shape[1]
    BT = tiles.BT
    dA = torch.empty(B * H, nts, BT, BT, dtype=torch.float32, device=do.device)
    chunk_hebbian_bwd_dA_kernel[(nts, B * H)](
        v, do, dA, log2g if log2g is not None else do, float(scale), T, t0, nts, H, HV, V,
        BT=BT, BV=_tile(V, 64), HAS_DECAY=log2g is not None, STRICT=strict,
        PREC=_prec(do.dtype), num_warps=4, num_stages=2)
    return dA


def chunk_bwd_dqk(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, strict, *, t0, nts, tiles):
    B, H, T, K = q.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.dqk_BK, tiles.dqk_BV
    grid = (triton.cdiv(K, BK), nts, B * H)
    chunk_hebbian_bwd_dqk_kernel[grid](
        q, k, v, h, do, dh, dA, dq, dk, log2g if log2g is not None else q, float(scale),
        T, t0, nts, H, HV, K, V, BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None,
        STRICT=strict, PREC=_prec(q.dtype), num_warps=_warps(tiles.BT, BK), num_stages=2)


def chunk_bwd_dv(q, k, do, dh, dv, log2g, scale, strict, *, t0, nts, t_dv, tiles):
    """dv: [B,H,TDV,V] whose time axis starts at global position t_dv."""
    B, H, T, K = q.shape
    V = do.shape[3]
    BK, BV = tiles.o_BK, tiles.o_BV
    grid = (triton.cdiv(V, BV), nts, B * H)
    chunk_hebbian_bwd_dv_kernel[grid](
        q, k, do, dh, dv, log2g if log2g is not None else q, float(scale), T, t0, nts,
        dv.shape[2], t_dv, H, K, V, BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None,
        STRICT=strict, PREC=_prec(q.dtype), num_warps=_warps(tiles.BT, BV), num_stages=2)

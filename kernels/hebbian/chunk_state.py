"""Chunked Hebbian attention in Triton, the state stages: forward and reverse state passing.

The chunked algorithm has one kernel per stage, in three files: chunk_state.py (fwd_h, bwd_dh),
chunk_output.py (fwd_o and the fused forward) and chunk_grad.py (bwd_dA, bwd_dqk, bwd_dv).
This docstring holds the notation they share.

Notation (the recurrence of naive.py). The sequence is cut into chunks of BT tokens;
h_c ∈ R^{K×V} is the state *before* chunk c, L the chunk's length (BT, or less for the last),
i, j ∈ [0, L) local positions and γ the per-head decay (1 when off). With the decay powers

    w_in_i = γ^i (strict) | γ^{i+1} (inclusive)           on the query, for the inter-chunk term
    D_ij   = γ^{i-1-j}, j < i (strict) | γ^{i-j}, j ≤ i   the masked intra-chunk weights
    w_k_j  = γ^{L-1-j}                                    on the key, for the state update

the stages are

    fwd_h   (state passing)   h_{c+1} = γ^L h_c + (w_k ⊙ K_c)ᵀ V_c                  sequential
    fwd_o   (output)          O_c = scale · (w_in ⊙ Q_c h_c + (D ⊙ Q_c K_cᵀ) V_c)
    bwd_dh  (reverse passing) dh_c = γ^L dh_{c+1} + scale · (w_in ⊙ Q_c)ᵀ dO_c       sequential
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
per element would double the address registers and spill. γ arrives as log2 γ (float32) and
γ^n = exp2(n · log2 γ).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_precision
from .common import _key_decay, _query_decay, _warps


@triton.jit
def _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T, t_s, b_lg, BT: tl.constexpr,
                        HAS_DECAY: tl.constexpr, PREC: tl.constexpr):
    """h_{c+1} = γ^L h_c + (w_k ⊙ K_c)ᵀ V_c for the chunk starting at t_s (L tokens of it are
    before T); b_kt [BK, BT] is K_cᵀ, b_v [BT, BV] is V_c, b_lg = log2 γ (unused without decay)."""
    if HAS_DECAY:
        L = tl.minimum(T - t_s, BT)
        b_wk = _key_decay(o_i, m_t, L, b_lg)
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
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
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
            b_qt = (b_qt * _query_decay(o_i, b_lg, STRICT)[None, :]).to(b_do.dtype)
            b_dh *= tl.exp2(L.to(tl.float32) * b_lg)
        b_dh += scale * tl.dot(b_qt, b_do, input_precision=PREC)
    tl.store(dh0 + i_bh * K * V + o_kv, b_dh, mask=m_kv)



# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
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
        STORE_H=store_h, STORE_HT=ht is not None, PREC=dot_precision(k.dtype),
        num_warps=_warps(BK, BV), num_stages=2)
    return h



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
        USE_DHT=dht is not None, PREC=dot_precision(q.dtype), num_warps=_warps(BK, BV),
        num_stages=2)
    return dh

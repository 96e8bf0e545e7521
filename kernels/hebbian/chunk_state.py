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

Layouts: q, k [B,H,T,K] and do, o [B,H,T,V], or all [B,T,H,·] (BTHK), each contiguous in its
layout; v [B,HV,T,V] (or [B,T,HV,V]) with HV = H, or HV = 1 when one v is shared by all heads
(read by head index i_h % HV: never copied). States [rows, H, K, V] float32; per-chunk buffers
[B·H, NTS, K, V].

Varlen (IS_VARLEN): one packed row (B = 1) of sequences, chunks aligned to each sequence's start.
The state kernels run one program per (sequence of the segment, head) and walk that sequence's
chunks of the segment, starting from its initial state (or the carry, when the sequence began
in an earlier segment) and ending in its final state (or the carry, when it goes on); the chunk
kernels run one program per chunk of the segment. The tables that say where each lies are
built by schedule.py and read by common._walk and common._chunk_span.

Addresses: B·H·T·K passes 2^31 at the
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
from .common import (LENGTH_ARGS, _key_decay, _query_decay, _row, _state_in, _state_out, _walk,
                     _warps, bhtd, or_placeholder as _or)


@triton.jit
def _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T_end, t_s, b_lg, BT: tl.constexpr,
                        HAS_DECAY: tl.constexpr, PREC: tl.constexpr):
    """h_{c+1} = γ^L h_c + (w_k ⊙ K_c)ᵀ V_c for the chunk starting at t_s (L tokens of it are
    before its sequence's end T_end); b_kt [BK, BT] is K_cᵀ, b_v [BT, BV] is V_c, b_lg = log2 γ
    (unused without decay)."""
    if HAS_DECAY:
        L = tl.minimum(T_end - t_s, BT)
        b_wk = _key_decay(o_i, m_t, L, b_lg)
        b_kt = (b_kt * b_wk[None, :]).to(b_v.dtype)
        b_h *= tl.exp2(L.to(tl.float32) * b_lg)
    return b_h + tl.dot(b_kt, b_v, input_precision=PREC)



# --------------------------------------------------------------------------------------------
# Stage 1: state passing. grid (cdiv(K, BK), cdiv(V, BV), rows·H); sequential over the segment.
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_fwd_h_kernel(k, v, h, h0, ht, hc0, hct, log2g, seqs, T, t0, NTS, H, HV, K, V,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                               HAS_DECAY: tl.constexpr, USE_H0: tl.constexpr,
                               STORE_H: tl.constexpr, STORE_HT: tl.constexpr,
                               IS_VARLEN: tl.constexpr, BTHK: tl.constexpr, PREC: tl.constexpr):
    i_k, i_v = tl.program_id(0), tl.program_id(1)
    i_nh = tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    t_first, T_end, n_t, slot0, i_s, c_in, c_out = _walk(seqs, i_n, T, t0, NTS, IS_VARLEN)
    i_b = i_s if not IS_VARLEN else i_s * 0           # a varlen row is batch 0
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_k, s_k = _row(k, i_b, i_h, H, T, K, BTHK)
    p_v, s_v = _row(v, i_b, i_h % HV, HV, T, V, BTHK)

    b_h = _state_in(h0, hc0, i_s, i_h, H, o_k, o_v, K, V, c_in, BK, BV, USE_H0, IS_VARLEN)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    for i_t in range(n_t):
        t_s = t_first + i_t * BT
        if STORE_H:
            p_h = h + ((i_b * H + i_h) * NTS + slot0 + i_t) * K * V
            tl.store(p_h + o_kv, b_h.to(p_h.dtype.element_ty), mask=m_kv)
        m_t = o_i < T_end - t_s
        # K_cᵀ tile [BK, BT] and V_c tile [BT, BV]; rows past the end load as 0. The chunk's
        # start goes into the (int64) base pointer; in-tile offsets stay small int32.
        b_kt = tl.load(p_k + t_s.to(tl.int64) * s_k + (o_i[None, :] * s_k + o_k[:, None]),
                       mask=m_k[:, None] & m_t[None, :], other=0.)
        b_v = tl.load(p_v + t_s.to(tl.int64) * s_v + (o_i[:, None] * s_v + o_v[None, :]),
                      mask=m_t[:, None] & m_v[None, :], other=0.)
        b_h = _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T_end, t_s, b_lg, BT, HAS_DECAY,
                                  PREC)
    _state_out(ht, hct, b_h, i_s, i_h, H, o_k, o_v, K, V, c_out, STORE_HT, IS_VARLEN)



# --------------------------------------------------------------------------------------------
# Stage 3 (backward): reverse state passing. grid (cdiv(K, BK), cdiv(V, BV), rows·H).
# Writes dh[c] = dL/d(state after chunk c) for the segment's chunks, and dL/d(the state the
# walk started from): the carry of a dense batch, or a varlen sequence's initial state (dh0)
# or the carry when it began in an earlier segment (dhc0). A walk starts from dL/d(its final
# state) (dht) or, varlen, from dL/d(the carry it ended in) (dhct).
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_bwd_dh_kernel(q, do, dh, dht, dh0, dhct, dhc0, log2g, seqs, scale, T, t0, NTS,
                                H, K, V,
                                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                                IS_VARLEN: tl.constexpr, BTHK: tl.constexpr, PREC: tl.constexpr):
    i_k, i_v = tl.program_id(0), tl.program_id(1)
    i_nh = tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    t_first, T_end, n_t, slot0, i_s, c_in, c_out = _walk(seqs, i_n, T, t0, NTS, IS_VARLEN)
    i_b = i_s if not IS_VARLEN else i_s * 0
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_q, s_q = _row(q, i_b, i_h, H, T, K, BTHK)
    p_do, s_do = _row(do, i_b, i_h, H, T, V, BTHK)

    # The reverse walk starts where the forward one ended: the roles of the carries swap.
    b_dh = _state_in(dht, dhct, i_s, i_h, H, o_k, o_v, K, V, c_out, BK, BV, USE_DHT, IS_VARLEN)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    for i_r in range(n_t):
        i_t = n_t - 1 - i_r
        t_s = t_first + i_t * BT
        p_dh = dh + ((i_b * H + i_h) * NTS + slot0 + i_t) * K * V
        tl.store(p_dh + o_kv, b_dh.to(p_dh.dtype.element_ty), mask=m_kv)
        m_t = o_i < T_end - t_s
        b_qt = tl.load(p_q + t_s.to(tl.int64) * s_q + (o_i[None, :] * s_q + o_k[:, None]),
                       mask=m_k[:, None] & m_t[None, :], other=0.)
        b_do = tl.load(p_do + t_s.to(tl.int64) * s_do + (o_i[:, None] * s_do + o_v[None, :]),
                       mask=m_t[:, None] & m_v[None, :], other=0.)
        if HAS_DECAY:
            L = tl.minimum(T_end - t_s, BT)
            b_qt = (b_qt * _query_decay(o_i, b_lg, STRICT)[None, :]).to(b_do.dtype)
            b_dh *= tl.exp2(L.to(tl.float32) * b_lg)
        b_dh += scale * tl.dot(b_qt, b_do, input_precision=PREC)
    _state_out(dh0, dhc0, b_dh, i_s, i_h, H, o_k, o_v, K, V, c_in, STORE_DH0, IS_VARLEN)



# --------------------------------------------------------------------------------------------
# Launchers. ``seg`` (schedule.Segment) says which chunks; ``bthk`` the layout. Pointer
# arguments a variant does not read get a placeholder tensor.
# --------------------------------------------------------------------------------------------
def chunk_fwd_h(k, v, log2g, h0, *, seg, tiles, bthk=False, store_h=True, ht=None, hc0=None,
                hct=None):
    """States before each chunk of the segment → h [B·H, seg.nts, K, V] in k's dtype. Each walk
    starts from its row of ``h0`` (float32 [rows, H, K, V]; None: zeros), or varlen from the
    carry ``hc0`` [H, K, V]; it ends in its row of ``ht`` (when given) or varlen in the carry
    ``hct`` (required for a varlen segment: the walk that goes on writes it)."""
    B, H, T, K = bhtd(k, bthk)
    HV, V = bhtd(v, bthk)[1], v.shape[3]
    BK, BV = tiles.h_BK, tiles.h_BV
    nts = seg.nts
    h = (torch.empty(B * H, nts, K, V, dtype=k.dtype, device=k.device) if store_h else None)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), seg.rows * H)
    chunk_hebbian_fwd_h_kernel[grid](
        k, v, _or(h, k), _or(h0, k), _or(ht, k), _or(hc0, k), _or(hct, k), _or(log2g, k),
        _or(seg.seqs, k), T, seg.t0, nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, USE_H0=h0 is not None,
        STORE_H=store_h, STORE_HT=ht is not None, IS_VARLEN=seg.seqs is not None, BTHK=bthk,
        PREC=dot_precision(k.dtype), num_warps=_warps(BK, BV), num_stages=2)
    return h



def chunk_bwd_dh(q, do, log2g, dht, dh0, scale, strict, *, seg, tiles, bthk=False, dhct=None,
                 dhc0=None):
    """dh [B·H, seg.nts, K, V] (grad of the state after each chunk). Each reverse walk starts
    from its row of ``dht`` (None: zeros), or varlen from ``dhct`` [H, K, V] (the grad of the
    carry its sequence went on with); it ends in its row of ``dh0`` (float32; None: not kept;
    a dense ``dh0`` may alias ``dht``: each program reads its tile first) or varlen in ``dhc0``
    (required for a varlen segment)."""
    B, H, T, K = bhtd(q, bthk)
    V = do.shape[3]
    BK, BV = tiles.h_BK, tiles.h_BV
    dh = torch.empty(B * H, seg.nts, K, V, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), seg.rows * H)
    chunk_hebbian_bwd_dh_kernel[grid](
        q, do, dh, _or(dht, q), _or(dh0, q), _or(dhct, q), _or(dhc0, q), _or(log2g, q),
        _or(seg.seqs, q), float(scale), T, seg.t0, seg.nts, H, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        USE_DHT=dht is not None, STORE_DH0=dh0 is not None, IS_VARLEN=seg.seqs is not None,
        BTHK=bthk, PREC=dot_precision(q.dtype), num_warps=_warps(BK, BV), num_stages=2)
    return dh

"""Chunked Hebbian attention in Triton, the output stage: O from the per-chunk states (fwd_o),
or the fused forward that keeps the state in registers and never writes per-chunk states.
Notation: chunk_state.py."""
from __future__ import annotations

import triton
import triton.language as tl

from .chunk_state import _chunk_state_update
from ..checks import same_tensor
from ..launch import dot_precision
from .common import (LENGTH_ARGS, _causal_weights, _chunk_span, _query_decay, _row, _state_in,
                     _state_out, _walk, _warps, bhtd, or_placeholder as _or)
from .plan import fused_needs_atomics


# --------------------------------------------------------------------------------------------
# Stage 2: output. grid (cdiv(V, BV), NTS, B·H); loops over K tiles.
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_fwd_o_kernel(q, k, v, h, o, log2g, chunks, scale, T, t0, NTS, H, HV, K, V,
                               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                               HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                               IS_VARLEN: tl.constexpr, BTHK: tl.constexpr, PREC: tl.constexpr):
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
    p_h = h + (i_bh * NTS + i_t) * K * V
    o_tk = o_i * s_q

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

    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    m_A, b_D = _causal_weights(o_i[:, None], o_i[None, :], b_lg, STRICT)
    if HAS_DECAY:
        b_o *= _query_decay(o_i, b_lg, STRICT)[:, None]
        b_A *= b_D
    b_A = tl.where(m_A, b_A, 0.)
    p_v, s_v = _row(v, i_b, i_h % HV, HV, T, V, BTHK)
    b_v = tl.load(p_v + t_s.to(tl.int64) * s_v + (o_i[:, None] * s_v + o_v[None, :]),
                  mask=m_t[:, None] & m_v[None, :], other=0.)
    b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
    p_o, s_o = _row(o, i_b, i_h, H, T, V, BTHK)
    tl.store(p_o + t_s.to(tl.int64) * s_o + (o_i[:, None] * s_o + o_v[None, :]),
             (b_o * scale).to(p_o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])



# --------------------------------------------------------------------------------------------
# Forward, fused (the alternative to fwd_h + fwd_o). grid (cdiv(V, BV), cdiv(K, BK), rows·H).
# Each program keeps its [BK, BV] slice of the state in float32 registers and walks the chunks
# in order, adding that slice's share of every chunk's output,
#     O_c[:, v-tile] += scale · (w_in ⊙ Q_c[:, k-tile] h_c[k-tile, v-tile]
#                               + (D ⊙ Q_c[:, k-tile] K_c[:, k-tile]ᵀ) V_c[:, v-tile]),
# which is exact because both terms are sums over K (the mask D is applied per K slice). The
# per-chunk states are never written to memory: the cost moves to the cross-K-tile sum of O,
# done with float32 atomics into a buffer that fits in L2 (ATOMIC), or with plain stores when
# one K tile covers K. Programs that differ only in the V tile are adjacent in the grid, so
# they read the same Q_c, K_c tiles at about the same time (from L2 after the first). When q and
# k are one tensor (BDH) the kernel loads the tile once (SAME_QK): half the Q/K traffic through
# L2 and one [BT, BK] tile fewer in registers. Varlen: one walk per (sequence, head), as fwd_h.
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LENGTH_ARGS)
def chunk_hebbian_fwd_fused_kernel(q, k, v, o, h0, ht, hc0, hct, log2g, seqs, scale, T, t0, NTS,
                                   H, HV, K, V,
                                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                   HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                   USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                                   ATOMIC: tl.constexpr, SAME_QK: tl.constexpr,
                                   IS_VARLEN: tl.constexpr, BTHK: tl.constexpr,
                                   PREC: tl.constexpr):
    i_v, i_k = tl.program_id(0), tl.program_id(1)
    i_nh = tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    t_first, T_end, n_t, slot0, i_s, c_in, c_out = _walk(seqs, i_n, T, t0, NTS, IS_VARLEN)
    i_b = i_s if not IS_VARLEN else i_s * 0           # a varlen row is batch 0
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    p_q, s_q = _row(q, i_b, i_h, H, T, K, BTHK)
    p_k, _ = _row(k, i_b, i_h, H, T, K, BTHK)
    p_v, s_v = _row(v, i_b, i_h % HV, HV, T, V, BTHK)
    p_o, s_o = _row(o, i_b, i_h, H, T, V, BTHK)

    b_h = _state_in(h0, hc0, i_s, i_h, H, o_k, o_v, K, V, c_in, BK, BV, USE_H0, IS_VARLEN)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    m_A, b_D = _causal_weights(o_i[:, None], o_i[None, :], b_lg, STRICT)
    b_win = _query_decay(o_i, b_lg, STRICT)
    # Q and K tiles share one int32 offset tile; V and O have their own (their token strides
    # differ in the [B,T,H,·] layout when v is shared). The chunk's start moves the (int64) base
    # pointers. K is loaded row-major like Q and transposed in registers.
    o_tk = o_i[:, None] * s_q + o_k[None, :]
    o_tv = o_i[:, None] * s_v + o_v[None, :]
    o_to = o_i[:, None] * s_o + o_v[None, :]
    for i_t in range(n_t):
        t_s = t_first + i_t * BT
        m_t = o_i < T_end - t_s
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load((p_q + t_s.to(tl.int64) * s_q) + o_tk, mask=m_tk, other=0.)
        if SAME_QK:                             # BDH: q is k, so one load serves both
            b_kt = tl.trans(b_q)
        else:
            b_kt = tl.trans(tl.load((p_k + t_s.to(tl.int64) * s_q) + o_tk, mask=m_tk, other=0.))
        b_v = tl.load((p_v + t_s.to(tl.int64) * s_v) + o_tv, mask=m_tv, other=0.)
        b_o = tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
        b_A = tl.dot(b_q, b_kt, input_precision=PREC)
        if HAS_DECAY:
            b_o *= b_win[:, None]
            b_A *= b_D
        b_A = tl.where(m_A, b_A, 0.)
        b_o = (b_o + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)) * scale
        p_ot = (p_o + t_s.to(tl.int64) * s_o) + o_to
        if ATOMIC:
            tl.atomic_add(p_ot, b_o, mask=m_tv, sem="relaxed")
        else:
            tl.store(p_ot, b_o.to(p_o.dtype.element_ty), mask=m_tv)
        b_h = _chunk_state_update(b_h, b_kt, b_v, m_t, o_i, T_end, t_s, b_lg, BT, HAS_DECAY,
                                  PREC)
    _state_out(ht, hct, b_h, i_s, i_h, H, o_k, o_v, K, V, c_out, STORE_HT, IS_VARLEN)



# --------------------------------------------------------------------------------------------
# Launchers. ``seg`` (schedule.Segment) says which chunks; ``bthk`` the layout.
# --------------------------------------------------------------------------------------------
def chunk_fwd_o(q, k, v, h, o, log2g, scale, strict, *, seg, tiles, bthk=False):
    B, H, T, K = bhtd(q, bthk)
    HV, V = bhtd(v, bthk)[1], v.shape[3]
    BK, BV = tiles.o_BK, tiles.o_BV
    grid = (triton.cdiv(V, BV), seg.nts, B * H)
    chunk_hebbian_fwd_o_kernel[grid](
        q, k, v, h, o, _or(log2g, q), _or(seg.chunks, q), float(scale), T, seg.t0, seg.nts, H,
        HV, K, V, BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        IS_VARLEN=seg.chunks is not None, BTHK=bthk, PREC=dot_precision(q.dtype),
        num_warps=_warps(tiles.BT, BV), num_stages=2)


def chunk_fwd_fused(q, k, v, o, log2g, h0, ht, scale, strict, *, seg, tiles, bthk=False,
                    hc0=None, hct=None):
    """The segment ``seg`` of the fused forward. ``o`` is float32 and zeroed when
    `fused_needs_atomics` (programs add into it), else the output itself. States as
    `chunk_state.chunk_fwd_h`: each walk starts from its row of ``h0`` (or varlen the carry
    ``hc0``) and ends in its row of ``ht`` (when given; or varlen the carry ``hct``). q and k
    may be one tensor (read once)."""
    B, H, T, K = bhtd(q, bthk)
    HV, V = bhtd(v, bthk)[1], v.shape[3]
    BK, BV = tiles.fused_BK, tiles.fused_BV
    grid = (triton.cdiv(V, BV), triton.cdiv(K, BK), seg.rows * H)
    chunk_hebbian_fwd_fused_kernel[grid](
        q, k, v, o, _or(h0, q), _or(ht, q), _or(hc0, q), _or(hct, q), _or(log2g, q),
        _or(seg.seqs, q), float(scale), T, seg.t0, seg.nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        USE_H0=h0 is not None, STORE_HT=ht is not None, ATOMIC=fused_needs_atomics(K, tiles),
        SAME_QK=same_tensor(q, k), IS_VARLEN=seg.seqs is not None, BTHK=bthk,
        PREC=dot_precision(q.dtype), num_warps=tiles.fused_warps or _warps(BK, BV),
        num_stages=2)

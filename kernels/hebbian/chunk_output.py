"""Chunked Hebbian attention in Triton, the output stage: O from the per-chunk states (fwd_o),
or the fused forward that keeps the state in registers and never writes per-chunk states.
Notation: chunk_state.py."""
from __future__ import annotations

import triton
import triton.language as tl

from .chunk_state import _chunk_state_update
from ..checks import same_tensor
from ..launch import dot_precision
from .common import _causal_weights, _query_decay, _warps
from .plan import fused_needs_atomics


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

    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    m_A, b_D = _causal_weights(o_i[:, None], o_i[None, :], b_lg, STRICT)
    if HAS_DECAY:
        b_o *= _query_decay(o_i, b_lg, STRICT)[:, None]
        b_A *= b_D
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
# they read the same Q_c, K_c tiles at about the same time (from L2 after the first). When q and
# k are one tensor (BDH) the kernel loads the tile once (SAME_QK): half the Q/K traffic through
# L2 and one [BT, BK] tile fewer in registers.
# --------------------------------------------------------------------------------------------
@triton.jit
def chunk_hebbian_fwd_fused_kernel(q, k, v, o, h0, ht, log2g, scale, T, t0, NTS, H, HV, K, V,
                                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                   HAS_DECAY: tl.constexpr, STRICT: tl.constexpr,
                                   USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                                   ATOMIC: tl.constexpr, SAME_QK: tl.constexpr,
                                   PREC: tl.constexpr):
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

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(h0 + i_bh * K * V + o_kv, mask=m_kv, other=0.)
    b_lg = 0.                                   # log2 γ; 0 (γ = 1) without decay
    if HAS_DECAY:
        b_lg = tl.load(log2g + i_h).to(tl.float32)
    m_A, b_D = _causal_weights(o_i[:, None], o_i[None, :], b_lg, STRICT)
    b_win = _query_decay(o_i, b_lg, STRICT)
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
        if SAME_QK:                             # BDH: q is k, so one load serves both
            b_kt = tl.trans(b_q)
        else:
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
# Launchers
# --------------------------------------------------------------------------------------------
def chunk_fwd_o(q, k, v, h, o, log2g, scale, strict, *, t0, nts, tiles):
    B, H, T, K = q.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.o_BK, tiles.o_BV
    grid = (triton.cdiv(V, BV), nts, B * H)
    chunk_hebbian_fwd_o_kernel[grid](
        q, k, v, h, o, log2g if log2g is not None else q, float(scale), T, t0, nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        PREC=dot_precision(q.dtype), num_warps=_warps(tiles.BT, BV), num_stages=2)


def chunk_fwd_fused(q, k, v, o, log2g, h0, ht, scale, strict, *, t0, nts, tiles):
    """The segment [t0, t0 + nts·BT) of the fused forward. ``o`` is float32 and zeroed when
    `fused_needs_atomics` (programs add into it), else the output itself; the state after the
    segment goes to ``ht`` (float32) when given. q and k may be one tensor (read once)."""
    B, H, T, K = q.shape
    HV, V = v.shape[1], v.shape[3]
    BK, BV = tiles.fused_BK, tiles.fused_BV
    grid = (triton.cdiv(V, BV), triton.cdiv(K, BK), B * H)
    chunk_hebbian_fwd_fused_kernel[grid](
        q, k, v, o, h0 if h0 is not None else q, ht if ht is not None else q,
        log2g if log2g is not None else q, float(scale), T, t0, nts, H, HV, K, V,
        BT=tiles.BT, BK=BK, BV=BV, HAS_DECAY=log2g is not None, STRICT=strict,
        USE_H0=h0 is not None, STORE_HT=ht is not None, ATOMIC=fused_needs_atomics(K, tiles),
        SAME_QK=same_tensor(q, k), PREC=dot_precision(q.dtype),
        num_warps=tiles.fused_warps or _warps(BK, BV), num_stages=2)

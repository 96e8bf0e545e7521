"""The Triton form of `decode_rows.bsbr_rows_step` (the math and the state's layout are there):
two launches per layer and token, one program per (row, head) in each.

  _rows_attend   the local softmax over the partial chunk and the token (online softmax over
                 blocks of the buffer's filled tokens), the routing over the used slots (scores,
                 a rank-based top-k, the softmax of the kept ones), the readout of the picked
                 slots' F only, and the bounded bank's salience update; writes o.
  _rows_advance  the token into the partial chunk, or, when it completes the chunk, the chunk's
                 (Σ kᵀv by tl.dot, mean k) into the bank through the masked cascade (fold the
                 top level's least salient slot into the archive, merge each full level's two
                 oldest upwards, append at level 0) and fill back to 0.
Every count the step reads (fill, the per-level slot counts) is read on the device, so the two
launches replay from a CUDA graph unchanged. Slot moves are copies of [K, V] tiles inside one
program, oldest slot first, so a shift never reads a slot it has already written; each move
ends with a barrier, so the next one (which may read what it wrote: a merged slot, the
archive) sees it from every warp. These moves run only when a chunk completes (every C tokens
per row); the other steps only write the token into the buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import INTERPRET, dot_precision

_TABLES: dict = {}


def _tables(layout, device):
    """Per (layout, device): caps [L], region starts [L], and per slot its level (the archive:
    L) and index in its region, int32 on the device (built once)."""
    key = (layout.caps, layout.bounded, str(device))
    if key not in _TABLES:
        L = layout.levels
        level, pos = [L], [0]
        for lvl in range(L - 1, -1, -1):
            level += [lvl] * layout.caps[lvl]
            pos += list(range(layout.caps[lvl]))
        starts = [layout.start(lvl) for lvl in range(L)]
        _TABLES[key] = tuple(torch.tensor(x, dtype=torch.int32, device=device)
                             for x in (list(layout.caps), starts, level, pos))
    return _TABLES[key]


@triton.jit
def _rows_attend(q, k, v, kbuf, vbuf, fill, F, hs, sal, counts, slot_level, slot_pos, valid, o,
                 sqb, sqh, skb, skh, svb, svh, sob, soh, H, G, K, V, C1, S, scale, long_scale,
                 inv_sqrt_k, decay, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BJ: tl.constexpr, BS: tl.constexpr, TOPK: tl.constexpr, BOUNDED: tl.constexpr,
                 HAS_VALID: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = tl.load(q + i_b * sqb + i_h * sqh + o_k, mask=m_k, other=0.).to(tl.float32)
    # the key as the buffer will hold it
    b_k = tl.load(k + i_b * skb + i_hk * skh + o_k, mask=m_k, other=0.)
    b_k = b_k.to(kbuf.dtype.element_ty).to(tl.float32)
    f = tl.load(fill + i_bh)
    s_self = tl.sum(b_q * b_k, 0) * scale
    # routing over the used slots
    o_s = tl.arange(0, BS)
    m_s = o_s < S
    lvl = tl.load(slot_level + o_s, mask=m_s, other=0)
    pos = tl.load(slot_pos + o_s, mask=m_s, other=0)
    cnt = tl.load(counts + i_bh * (L + 1) + tl.where(lvl == L, 0, 1 + lvl), mask=m_s, other=0)
    used = m_s & tl.where(lvl == L, cnt > 0, pos < cnt)
    b_h = tl.load(hs + (i_bh * S + o_s[:, None]) * K + o_k[None, :],
                  mask=m_s[:, None] & m_k[None, :], other=0.)
    sc = tl.where(used, tl.sum(b_h * b_q[None, :], 1) * inv_sqrt_k, float("-inf"))
    if TOPK < BS:
        # slot s is kept when fewer than TOPK used slots beat it (a higher score, or an equal
        # one at a lower index)
        beats = (sc[None, :] > sc[:, None]) | ((sc[None, :] == sc[:, None])
                                                & (o_s[None, :] < o_s[:, None]))
        beats = beats & used[None, :]
        sel = used & (tl.sum(beats.to(tl.int32), 1) < TOPK)
    else:
        sel = used
    mx = tl.max(tl.where(sel, sc, float("-inf")), 0)
    mx = tl.where(mx == float("-inf"), 0., mx)
    e = tl.where(sel, tl.exp(sc - mx), 0.)
    den = tl.sum(e, 0)
    w = e / tl.where(den > 0, den, 1.)
    if BOUNDED:
        real = True
        if HAS_VALID:
            real = tl.load(valid + i_b) != 0
        s_old = tl.load(sal + i_bh * S + o_s, mask=m_s, other=0.)
        tl.store(sal + i_bh * S + o_s, tl.where(used & real, s_old * decay + w, s_old),
                 mask=m_s)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + i_b * svb + i_hk * svh + o_v, mask=m_v, other=0.)
        b_v = b_v.to(vbuf.dtype.element_ty).to(tl.float32)
        # online softmax, starting from the token itself, over the buffer's filled tokens
        m_i = s_self
        l_i = s_self * 0. + 1.
        acc = b_v
        for j0 in range(0, f, BJ):
            o_j = j0 + tl.arange(0, BJ)
            m_j = o_j < f
            kb = tl.load(kbuf + (i_bh * C1 + o_j[:, None]) * K + o_k[None, :],
                         mask=m_j[:, None] & m_k[None, :], other=0.).to(tl.float32)
            s_j = tl.where(m_j, tl.sum(kb * b_q[None, :], 1) * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_j, 0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s_j - m_new)
            vb = tl.load(vbuf + (i_bh * C1 + o_j[:, None]) * V + o_v[None, :],
                         mask=m_j[:, None] & m_v[None, :], other=0.).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vb, 0)
            l_i = l_i * alpha + tl.sum(p, 0)
            m_i = m_new
        out = acc / l_i
        # the readout of the picked slots only
        long = tl.zeros([BV], tl.float32)
        for s in range(0, S):
            w_s = tl.sum(tl.where(o_s == s, w, 0.), 0)
            if w_s > 0:
                b_F = tl.load(F + ((i_bh * S + s) * K + o_k[:, None]) * V + o_v[None, :],
                              mask=m_k[:, None] & m_v[None, :], other=0.)
                long += w_s * tl.sum(b_q[:, None] * b_F, 0)
        out += long_scale * long
        tl.store(o + i_b * sob + i_h * soh + o_v, out.to(o.dtype.element_ty), mask=m_v)


@triton.jit
def _copy_slot(F, hs, sal, bh, S, K, V, dst, src, BK: tl.constexpr, BV: tl.constexpr):
    """Slot src → slot dst (F, h, salience) of one (row, head)."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v[None, :] < V)
        t = tl.load(F + ((bh * S + src) * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv)
        tl.store(F + ((bh * S + dst) * K + o_k[:, None]) * V + o_v[None, :], t, mask=m_kv)
    tl.store(hs + (bh * S + dst) * K + o_k, tl.load(hs + (bh * S + src) * K + o_k, mask=m_k),
             mask=m_k)
    tl.store(sal + bh * S + dst, tl.load(sal + bh * S + src))
    tl.debug_barrier()


@triton.jit
def _zero_slot(F, hs, sal, bh, S, K, V, dst, BK: tl.constexpr, BV: tl.constexpr):
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v[None, :] < V)
        tl.store(F + ((bh * S + dst) * K + o_k[:, None]) * V + o_v[None, :],
                 tl.zeros([BK, BV], tl.float32), mask=m_kv)
    tl.store(hs + (bh * S + dst) * K + o_k, tl.zeros([BK], tl.float32), mask=m_k)
    tl.store(sal + bh * S + dst, 0.)
    tl.debug_barrier()


@triton.jit
def _combine_slots(F, hs, sal, bh, S, K, V, dst, a, b, wa, BK: tl.constexpr, BV: tl.constexpr):
    """Slot dst ← (F_a + F_b, wa · h_a + (1 - wa) · h_b, s_a + s_b)."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_kv = m_k[:, None] & (o_v[None, :] < V)
        ta = tl.load(F + ((bh * S + a) * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv)
        tb = tl.load(F + ((bh * S + b) * K + o_k[:, None]) * V + o_v[None, :], mask=m_kv)
        tl.store(F + ((bh * S + dst) * K + o_k[:, None]) * V + o_v[None, :], ta + tb, mask=m_kv)
    ha = tl.load(hs + (bh * S + a) * K + o_k, mask=m_k)
    hb = tl.load(hs + (bh * S + b) * K + o_k, mask=m_k)
    tl.store(hs + (bh * S + dst) * K + o_k, ha * wa + hb * (1. - wa), mask=m_k)
    tl.store(sal + bh * S + dst, tl.load(sal + bh * S + a) + tl.load(sal + bh * S + b))
    tl.debug_barrier()


@triton.jit
def _full_up_to(counts, caps, base, LVL: tl.constexpr):
    """Whether levels 0..LVL are all full (read from memory: the counts before this step)."""
    full = tl.load(counts + base + 1) >= tl.load(caps)
    for l2 in tl.static_range(1, LVL + 1):
        full = full & (tl.load(counts + base + 1 + l2) >= tl.load(caps + l2))
    return full


@triton.jit
def _after_room(counts, caps, base, LVL: tl.constexpr, L: tl.constexpr):
    """Level LVL's used slots once it has made room (one fewer for a fold at the top, two fewer
    for a merge below it)."""
    c = tl.load(counts + base + 1 + LVL)
    if LVL == L - 1:
        gone = 1
    else:
        gone = 2
    return tl.where(_full_up_to(counts, caps, base, LVL), c - gone, c)


@triton.jit
def _rows_advance(k, v, kbuf, vbuf, fill, F, hs, sal, counts, caps, starts, valid,
                  skb, skh, svb, svh, H, G, K, V, C1, S, inv_c, L: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr,
                  BOUNDED: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    real = True
    if HAS_VALID:
        real = tl.load(valid + i_b) != 0
    f = tl.load(fill + i_bh)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_k = tl.load(k + i_b * skb + i_hk * skh + o_k, mask=m_k, other=0.).to(kbuf.dtype.element_ty)
    if (f < C1) & real:
        tl.store(kbuf + (i_bh * C1 + f) * K + o_k, b_k, mask=m_k)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < V
            b_v = tl.load(v + i_b * svb + i_hk * svh + o_v, mask=m_v, other=0.)
            tl.store(vbuf + (i_bh * C1 + f) * V + o_v, b_v.to(vbuf.dtype.element_ty), mask=m_v)
        tl.store(fill + i_bh, f + 1)
    if (f >= C1) & real:
        base = i_bh * (L + 1)
        if BOUNDED:
            if _full_up_to(counts, caps, base, L - 1):
                # the top level's least salient slot (the oldest among ties) → the archive
                st = tl.load(starts + (L - 1))
                cap = tl.load(caps + (L - 1))
                o_c = tl.arange(0, BC)
                s_top = tl.load(sal + i_bh * S + st + o_c, mask=o_c < cap, other=float("inf"))
                i = tl.argmin(s_top, 0)
                arch = tl.load(counts + base).to(tl.float32)
                _combine_slots(F, hs, sal, i_bh, S, K, V, 0, 0, st + i,
                               arch / (arch + (1 << (L - 1))), BK, BV)
                for j in range(i, cap - 1):
                    _copy_slot(F, hs, sal, i_bh, S, K, V, st + j, st + j + 1, BK, BV)
                _zero_slot(F, hs, sal, i_bh, S, K, V, st + cap - 1, BK, BV)
            for step in tl.static_range(L - 1):      # level L - 2 - step, from the top down
                if _full_up_to(counts, caps, base, L - 2 - step):
                    # the level's two oldest merge into one slot of the level above
                    st = tl.load(starts + (L - 2 - step))
                    cap = tl.load(caps + (L - 2 - step))
                    dst = tl.load(starts + (L - 1 - step)) \
                        + _after_room(counts, caps, base, L - 1 - step, L)
                    _combine_slots(F, hs, sal, i_bh, S, K, V, dst, st, st + 1, 0.5, BK, BV)
                    for j in range(0, cap - 2):
                        _copy_slot(F, hs, sal, i_bh, S, K, V, st + j, st + j + 2, BK, BV)
                    _zero_slot(F, hs, sal, i_bh, S, K, V, st + cap - 2, BK, BV)
                    _zero_slot(F, hs, sal, i_bh, S, K, V, st + cap - 1, BK, BV)
            dst = tl.load(starts) + _after_room(counts, caps, base, 0, L)
        else:
            dst = tl.load(starts) + tl.load(counts + base + 1)
        # the completed chunk: Σ kᵀv over the buffer and the token, and its mean key
        h_new = b_k.to(tl.float32)
        for j0 in range(0, C1, BJ):
            o_j = j0 + tl.arange(0, BJ)
            h_new += tl.sum(tl.load(kbuf + (i_bh * C1 + o_j[:, None]) * K + o_k[None, :],
                                    mask=(o_j[:, None] < C1) & m_k[None, :], other=0.)
                            .to(tl.float32), 0)
        tl.store(hs + (i_bh * S + dst) * K + o_k, h_new * inv_c, mask=m_k)
        tl.store(sal + i_bh * S + dst, 0.)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < V
            b_v = tl.load(v + i_b * svb + i_hk * svh + o_v, mask=m_v, other=0.)
            b_v = b_v.to(vbuf.dtype.element_ty).to(tl.float32)
            acc = b_k.to(tl.float32)[:, None] * b_v[None, :]
            for j0 in range(0, C1, BJ):
                o_j = j0 + tl.arange(0, BJ)
                m_j = o_j < C1
                kb = tl.load(kbuf + (i_bh * C1 + o_j[None, :]) * K + o_k[:, None],
                             mask=m_k[:, None] & m_j[None, :], other=0.)
                vb = tl.load(vbuf + (i_bh * C1 + o_j[:, None]) * V + o_v[None, :],
                             mask=m_j[:, None] & m_v[None, :], other=0.)
                acc += tl.dot(kb, vb, input_precision=PREC)
            tl.store(F + ((i_bh * S + dst) * K + o_k[:, None]) * V + o_v[None, :], acc,
                     mask=m_k[:, None] & m_v[None, :])
        # the counts after this chunk
        if BOUNDED:
            arch = tl.load(counts + base)
            top_full = _full_up_to(counts, caps, base, L - 1)
            tl.store(counts + base, tl.where(top_full, arch + (1 << (L - 1)), arch))
            # top-down (level L - 1 - step): a level's new count reads only its own and the
            # lower levels' old counts
            for step in tl.static_range(L - 1):
                c = _after_room(counts, caps, base, L - 1 - step, L) \
                    + _full_up_to(counts, caps, base, L - 2 - step).to(tl.int32)
                tl.store(counts + base + 1 + (L - 1 - step), c)
            tl.store(counts + base + 1, _after_room(counts, caps, base, 0, L) + 1)
        else:
            tl.store(counts + base + 1, tl.load(counts + base + 1) + 1)
        tl.store(fill + i_bh, 0)


def rows_step_triton(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout, *, scale,
                     long_scale, top_k, valid, out):
    """The step on validated inputs (`decode_rows.check_rows_step`); writes ``out`` [B,H,V]."""
    B, H, K = q.shape
    V, C1, S, L = v.shape[2], kbuf.shape[2], layout.slots, layout.levels
    if INTERPRET and torch.bfloat16 in (q.dtype, k.dtype, v.dtype, kbuf.dtype, out.dtype):
        raise ValueError("bsbr_rows_step: bf16 under TRITON_INTERPRET (the interpreter mis-loads "
                         "bf16); use float32 or float16 on the CPU")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    caps, starts, level, pos = _tables(layout, q.device)
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 4096 // BK))
    BJ = max(16, min(64, 4096 // BK))
    BS = max(16, triton.next_power_of_2(S))
    BC = max(16, triton.next_power_of_2(max(layout.caps)))
    TOPK = BS if top_k is None or top_k >= S else top_k
    has_valid = valid is not None
    valid_arg = valid.contiguous().view(torch.int8) if has_valid else fill
    G = H // k.shape[1]
    warps = 4 if BK * BV <= 4096 else 8
    _rows_attend[(B * H,)](
        q, k, v, kbuf, vbuf, fill, F, h, salience, counts, level, pos, valid_arg, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), H, G, K, V, C1, S, float(scale), float(long_scale),
        float(K ** -0.5), float(layout.decay), L=L, BK=BK, BV=BV, BJ=BJ, BS=BS, TOPK=TOPK,
        BOUNDED=layout.bounded, HAS_VALID=has_valid, num_warps=warps)
    _rows_advance[(B * H,)](
        k, v, kbuf, vbuf, fill, F, h, salience, counts, caps, starts, valid_arg,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), H, G, K, V, C1, S, 1.0 / (C1 + 1),
        L=L, BK=BK, BV=BV, BJ=BJ, BC=BC, BOUNDED=layout.bounded, HAS_VALID=has_valid,
        PREC=dot_precision(kbuf.dtype), num_warps=warps)
    return out

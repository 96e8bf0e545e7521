"""Block-sparse routed readout in Triton, forward and backward:

    long_t = Σ_k p_tk (q_t F_{idx_tk})        idx [B,H,T,k] int32 (-1 = none), F [B,H,S,K,V] fp32

  fwd    grid (cdiv(T, BT), cdiv(V, BV), B·H). A program owns BT queries of one (b,h) and a BV
         slice. It walks the slot range [min idx, max idx] of its tile and, for each slot that
         some row of the tile selected, adds w_t · (Q_tile @ F_j) with w_t = Σ_k p_tk [idx_tk = j]
         (0 for rows that did not pick j). Slots no row picked are never read.
  dq/dp  grid (cdiv(T, BT), B·H), the same walk, whole V per tile:
         dq_t += w_t · do_t F_jᵀ,   dp_tk = (q_t F_j)·do_t where idx_tk = j.
  dF     deterministic (no atomics): an inverse index (the (t, k) entries sorted by slot, one
         stable torch.sort, no host sync) lets a program gather exactly the queries that
         selected its slot j: dF_j = Σ (p_tk q_t)ᵀ do_t, in a fixed order. Each slot's run is cut
         into segments of about the mean run length (early slots are picked by many later
         queries: one program per slot made the pass as slow as its longest loop); grid
         (segments, cdiv(V, BV), B·H) writes per-segment partials, then a per-slot sum adds them
         in segment order.
The dot products run in float32 ("ieee" for float32 inputs, tf32 otherwise). Addresses: (b,h)
and slot bases in int64. Whole K per tile (K <= 256), V in BV <= 64 slices. The tile form reads
q head-major (a token-major q is copied); the dF pass reads q and do in either layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_precision, pow2_tile
from .launch import RUNTIME_SIZES as SIZES
from .launch import ReadoutLaunch
from .layout import token_rows
from .validate import TRITON_MAX_HEAD_DIM


@triton.jit(do_not_specialize=SIZES)
def _readout_fwd(q, F, idx, p, out, T, S, NK,
                 K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, BKS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    q += bh * T * K
    F += bh * S * K * V
    idx += bh * T * NK
    p += bh * T * NK
    out += bh * T * V
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_j = tl.arange(0, BKS)
    m_t = o_t < T
    m_sel = m_t[:, None] & (o_j[None, :] < NK)
    b_idx = tl.load(idx + o_t[:, None] * NK + o_j[None, :], mask=m_sel, other=-1)
    b_p = tl.load(p + o_t[:, None] * NK + o_j[None, :], mask=m_sel, other=0.)
    b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K),
                  other=0.).to(tl.float32)
    m_F = (o_k[:, None] < K) & (o_v[None, :] < V)
    b_acc = tl.zeros([BT, BV], tl.float32)
    # int64 slot counter: j·K·V is an address offset (the interpreter hands out Python ints)
    j_lo = tl.min(tl.where(b_idx >= 0, b_idx, S)).to(tl.int64)
    j_hi = tl.max(b_idx).to(tl.int64) + 1
    for j in range(j_lo, j_hi):
        m_j = b_idx == j
        if tl.sum(m_j.to(tl.int32)) > 0:                   # some row of the tile picked slot j
            b_w = tl.sum(tl.where(m_j, b_p, 0.), 1)
            b_F = tl.load(F + j * K * V + o_k[:, None] * V + o_v[None, :], mask=m_F,
                          other=0.)
            b_acc += b_w[:, None] * tl.dot(b_q, b_F, input_precision=PREC)
    tl.store(out + o_t[:, None] * V + o_v[None, :], b_acc, mask=m_t[:, None] & (o_v[None, :] < V))


@triton.jit(do_not_specialize=SIZES)
def _readout_bwd_dq_dp(q, F, idx, p, do, dq, dp, T, S, NK,
                       K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, BKS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    q += bh * T * K
    dq += bh * T * K
    F += bh * S * K * V
    idx += bh * T * NK
    p += bh * T * NK
    dp += bh * T * NK
    do += bh * T * V
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_j = tl.arange(0, BKS)
    m_t = o_t < T
    m_sel = m_t[:, None] & (o_j[None, :] < NK)
    m_tk = m_t[:, None] & (o_k[None, :] < K)
    b_idx = tl.load(idx + o_t[:, None] * NK + o_j[None, :], mask=m_sel, other=-1)
    b_p = tl.load(p + o_t[:, None] * NK + o_j[None, :], mask=m_sel, other=0.)
    b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_dq = tl.zeros([BT, BK], tl.float32)
    b_dp = tl.zeros([BT, BKS], tl.float32)
    j_lo = tl.min(tl.where(b_idx >= 0, b_idx, S)).to(tl.int64)
    j_hi = tl.max(b_idx).to(tl.int64) + 1
    for j in range(j_lo, j_hi):
        m_j = b_idx == j
        if tl.sum(m_j.to(tl.int32)) > 0:
            b_w = tl.sum(tl.where(m_j, b_p, 0.), 1)
            b_g = tl.zeros([BT], tl.float32)
            # V in BV slices keeps the F tile small ([BK, BV] fp32) at V = 128.
            for v0 in range(0, V, BV):
                o_v = v0 + tl.arange(0, BV)
                b_F = tl.load(F + j * K * V + o_k[:, None] * V + o_v[None, :],
                              mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
                b_do = tl.load(do + o_t[:, None] * V + o_v[None, :],
                               mask=m_t[:, None] & (o_v[None, :] < V), other=0.)
                b_g += tl.sum(tl.dot(b_q, b_F, input_precision=PREC) * b_do, 1)   # (q_t F_j)·do_t
                b_dq += b_w[:, None] * tl.dot(b_do, tl.trans(b_F), input_precision=PREC)
            b_dp += tl.where(m_j, b_g[:, None], 0.)
    tl.store(dq + o_t[:, None] * K + o_k[None, :], b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dp + o_t[:, None] * NK + o_j[None, :], b_dp, mask=m_sel)


@triton.jit(do_not_specialize=SIZES)
def _readout_dF_partial(q, p, do, order, seg_slot, seg_e0, seg_e1, P, H, T, S, NK, NSEG,
                        K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr,
                        BTHK: tl.constexpr):
    """P[seg] = Σ_{entries of the segment} (p q_t)ᵀ do_t: one segment of one slot's run.
    LOWP: 16-bit operands (p·q rounded to q's dtype, do in q's dtype) on the tensor cores with
    float32 accumulation, as the grouped forward's products; else float32 operands (PREC).
    q and do lie in either layout (layout.py)."""
    i_s, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    j = tl.load(seg_slot + bh * NSEG + i_s)
    if j < S:                       # pseudo-slot S (idx = -1) and spare programs: nothing to do
        e_lo = tl.load(seg_e0 + bh * NSEG + i_s)
        e_hi = tl.load(seg_e1 + bh * NSEG + i_s)
        q, sq = token_rows(q, bh, H, T, K, BTHK)
        do, sdo = token_rows(do, bh, H, T, V, BTHK)
        p += bh * T * NK
        order += bh * T * NK
        P += (bh * NSEG + i_s) * K * V
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        b_dF = tl.zeros([BK, BV], tl.float32)
        for e0 in range(e_lo, e_hi, BE):
            o_e = e0 + tl.arange(0, BE)
            m_e = o_e < e_hi
            b_ent = tl.load(order + o_e, mask=m_e, other=0)   # flat (t, k) entry picking slot j
            o_t = b_ent // NK
            b_w = tl.load(p + b_ent, mask=m_e, other=0.)
            b_q = tl.load(q + o_t[:, None] * sq + o_k[None, :],
                          mask=m_e[:, None] & (o_k[None, :] < K), other=0.)
            b_do = tl.load(do + o_t[:, None] * sdo + o_v[None, :],
                           mask=m_e[:, None] & (o_v[None, :] < V), other=0.)
            b_a = b_q.to(tl.float32) * b_w[:, None]
            if LOWP:
                b_dF += tl.dot(tl.trans(b_a.to(q.dtype.element_ty)),
                               b_do.to(q.dtype.element_ty))
            else:
                b_dF += tl.dot(tl.trans(b_a), b_do.to(tl.float32), input_precision=PREC)
        tl.store(P + o_k[:, None] * V + o_v[None, :], b_dF,
                 mask=(o_k[:, None] < K) & (o_v[None, :] < V))


@triton.jit(do_not_specialize=SIZES)
def _sum_segments(P, seg_end, seg_n, dF, S, NSEG, KV, BLK: tl.constexpr):
    """dF_j = Σ of slot j's segments, in segment order (deterministic); 0 for unpicked slots."""
    i_j, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    hi = tl.load(seg_end + bh * (S + 1) + i_j)
    lo = hi - tl.load(seg_n + bh * (S + 1) + i_j)
    o_c = i_c * BLK + tl.arange(0, BLK)
    m_c = o_c < KV
    acc = tl.zeros([BLK], tl.float32)
    for s in range(lo, hi):
        acc += tl.load(P + (bh * NSEG + s) * KV + o_c, mask=m_c, other=0.)
    tl.store(dF + (bh * S + i_j) * KV + o_c, acc.to(dF.dtype.element_ty), mask=m_c)


def slot_runs(order, starts, S, n_ent, block):
    """Cut each slot's run of sorted entries (and the pseudo-slot S of idx = -1 entries) into
    programs of at most `block` entries. Returns per program (slot, first entry, end entry) as
    int32 [BH, NP] (slot S + 1 marks spare programs past the last one), NP (an upper bound,
    cdiv(n_ent, block) + S + 1: no host sync), and per slot the end of its program range and its
    program count ([BH, S + 1] each)."""
    BH, dev = starts.shape[0], starts.device
    run = torch.cat([starts.long(), torch.full((BH, 1), n_ent, device=dev)], 1)   # [BH, S+2]
    nblk = (run[:, 1:] - run[:, :-1] + block - 1) // block                       # [BH, S+1]
    ends = nblk.cumsum(-1)
    NP = triton.cdiv(n_ent, block) + S + 1
    pid = torch.arange(NP, device=dev).expand(BH, NP).contiguous()
    slot = torch.searchsorted(ends, pid, right=True)                              # [BH, NP]
    js = slot.clamp(max=S)
    first = ends.gather(1, js) - nblk.gather(1, js)
    e0 = run.gather(1, js) + (pid - first) * block
    e1 = torch.minimum(run.gather(1, js + 1), e0 + block)
    as32 = lambda t: t.to(torch.int32).contiguous()
    return as32(slot), as32(e0), as32(e1), NP, as32(ends), as32(nblk)


def segment_entries(n_ent: int, S: int) -> int:
    """Entries per dF program: about the mean run length, so the early slots (picked by many
    later queries) are split over several programs instead of one long serial loop."""
    return min(4096, max(64, triton.next_power_of_2(max(1, n_ent // max(S, 1)))))


def slot_segments(order, starts, S, n_ent):
    """The programs of the per-slot sums (the readout's dF, the routing's dh): each slot's run
    cut into segments of `segment_entries`; the slot_runs tuple (slot, first entry, end entry,
    NSEG, per-slot segment end, count)."""
    return slot_runs(order, starts, S, n_ent, segment_entries(n_ent, S))


def sum_dF_segments(P, seg_end, seg_n, F_shape, F_dtype):
    """dF [B,H,S,K,V] from the per-segment partials P [B·H, NSEG, K, V]: per slot, its
    segments in order (deterministic); 0 for unpicked slots."""
    S, K, V = F_shape[2], F_shape[3], F_shape[4]
    dF = torch.empty(F_shape, dtype=F_dtype, device=P.device)
    BLK = 1024
    _sum_segments[(S, triton.cdiv(K * V, BLK), P.shape[0])](P, seg_end, seg_n, dF, S, P.shape[1],
                                                            K * V, BLK=BLK)
    return dF


def routed_readout_dF(q, p, do, order, starts, F_shape, F_dtype, meta, launch: ReadoutLaunch,
                      lowp=False, bthk=False):
    """dF [B,H,S,K,V] = Σ over the entries that picked each slot of (p q_t)ᵀ do_t. Two
    deterministic passes (no atomics): per-segment partials, then a per-slot sum in order, at
    ``launch``'s df_block / df_block_v / df_warps. do may be 16-bit (it is read as stored);
    lowp: 16-bit products (see _readout_dF_partial); q and do stored token-major when bthk."""
    B, H, T, K = q.shape
    S, V = F_shape[2], F_shape[4]
    NK = p.shape[3]
    seg, e0, e1, NSEG, seg_end, seg_n = slot_segments(order, starts, S, T * NK)
    P = torch.empty(B * H, NSEG, K, V, dtype=torch.float32, device=q.device)
    BV = pow2_tile(V, launch.df_block_v)
    _readout_dF_partial[(NSEG, triton.cdiv(V, BV), B * H)](
        q, p, do, order, seg, e0, e1, P, H, T, S, NK, NSEG, BE=launch.df_block, BV=BV, LOWP=lowp,
        BTHK=bthk, num_warps=launch.df_warps, **meta)
    return sum_dF_segments(P, seg_end, seg_n, F_shape, F_dtype)


def _bv(V):
    return pow2_tile(V, 64)


def _meta(q, F):
    K, V = F.shape[-2], F.shape[-1]
    return dict(K=K, V=V, BK=pow2_tile(K, TRITON_MAX_HEAD_DIM), PREC=dot_precision(q.dtype))


def _inverse_index(idx, S):
    """Entries (t·NK + k) of each (b,h) sorted by the slot they picked, and where each slot's run
    starts: starts [BH, S+1] (entries with idx = -1 sort last, past starts[S])."""
    BH = idx.shape[0] * idx.shape[1]
    key = idx.reshape(BH, -1).long()
    key = torch.where(key >= 0, key, S)
    sorted_key, order = torch.sort(key, dim=-1, stable=True)
    slots = torch.arange(S + 1, device=idx.device).expand(BH, S + 1).contiguous()
    starts = torch.searchsorted(sorted_key, slots)
    return order.to(torch.int32).contiguous(), starts.to(torch.int32).contiguous()


def inverse_index(idx, S, shared=None):
    """`_inverse_index` of idx, or the one `shared` (a SharedInverseIndex) holds for it."""
    return shared.get(idx, S) if shared is not None else _inverse_index(idx, S)


class SharedInverseIndex:
    """The inverse index of ONE call's picks, sorted once and shared by the readout (forward
    and backward) and the Triton routing's backward, which need the same sort of the same idx.
    Why: at 32k, H16, top-k 8 each stable sort took ~0.37 ms of a fwd+bwd (H200 profile), and
    the two sorted identical picks. Create one per call; the first `get` sorts."""

    def __init__(self):
        self._got = None

    def get(self, idx, S):
        key = (tuple(idx.shape), S)
        if self._got is None:
            self._got = key, _inverse_index(idx, S)
        elif self._got[0] != key:
            raise ValueError(f"SharedInverseIndex: made for picks {self._got[0][0]} over "
                             f"{self._got[0][1]} slots, asked for {key[0]} over {S}")
        return self._got[1]


class RoutedReadoutTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, F, idx, p, launch):
        q, F = q.contiguous(), F.contiguous()
        idx = idx.to(torch.int32).contiguous()
        p32 = p.to(torch.float32).contiguous()
        B, H, T, K = q.shape
        S, V, NK = F.shape[2], F.shape[4], idx.shape[3]
        meta = _meta(q, F)
        BT, BV = 32, _bv(V)
        out = torch.empty(B, H, T, V, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(T, BT), triton.cdiv(V, BV), B * H)
        _readout_fwd[grid](q, F, idx, p32, out, T, S, NK, BT=BT, BV=BV,
                           BKS=triton.next_power_of_2(NK), **meta)
        ctx.save_for_backward(q, F, idx, p32)
        ctx.p_dtype, ctx.launch = p.dtype, launch
        return out

    @staticmethod
    def backward(ctx, do):
        q, F, idx, p = ctx.saved_tensors
        do = do.to(torch.float32).contiguous()
        B, H, T, K = q.shape
        S, V, NK = F.shape[2], F.shape[4], idx.shape[3]
        meta = _meta(q, F)
        dq = torch.empty_like(q)
        dp = torch.empty(B, H, T, NK, dtype=torch.float32, device=q.device)
        BT = 32
        _readout_bwd_dq_dp[(triton.cdiv(T, BT), B * H)](
            q, F, idx, p, do, dq, dp, T, S, NK, BT=BT, BV=_bv(V), BKS=triton.next_power_of_2(NK),
            **meta)
        order, starts = _inverse_index(idx, S)
        dF = routed_readout_dF(q, p, do, order, starts, F.shape, F.dtype, meta, ctx.launch)
        return dq, dF, None, dp.to(ctx.p_dtype), None


def routed_readout_triton(q, F, idx, p, launch: ReadoutLaunch = ReadoutLaunch(), *,
                          local=None, scale=1.0, inverse=None, bthk=False):
    """q [B,H,T,K] (fp16/bf16/fp32), F [B,H,S,K,V] float32, idx [B,H,T,k] (-1 = none),
    p [B,H,T,k]. Returns long = scale · Σ_k p q F_idx [B,H,T,V] float32, or, with `local`
    [B,H,T,V], local + long in local's dtype (the grouped form adds it in the same pass as the
    sum over the picks). Differentiable in q, F, p (and local).
    launch.mode: "grouped" (per slot, exact O(T·k·d²) work; readout_grouped.py) or "tile" (per
    query tile over the union of its picks; this file); the rest of ``launch`` sets the tiles.
    inverse: a SharedInverseIndex of these picks (the routing backward's sort, reused).
    bthk: q (and local, and the output with it) stored token-major (layout.py)."""
    if not isinstance(launch, ReadoutLaunch):
        raise TypeError(f"launch: expected a ReadoutLaunch, got {type(launch).__name__}")
    if F.dtype != torch.float32:
        raise TypeError(f"F: the Triton readout takes float32 states, got {F.dtype}")
    for name, d in (("q", q.shape[-1]), ("F", F.shape[-1])):
        if d > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{name}: the Triton readout takes head dims up to "
                             f"{TRITON_MAX_HEAD_DIM}, got {d} (use backend='torch')")
    if local is not None and local.shape != (*q.shape[:3], F.shape[-1]):
        raise ValueError(f"local: expected shape {(*q.shape[:3], F.shape[-1])}, "
                         f"got {tuple(local.shape)}")
    if q.shape[2] == 0 or idx.shape[3] == 0:
        long = torch.zeros(*q.shape[:3], F.shape[-1], dtype=torch.float32, device=q.device)
        return long if local is None else local + long.to(local.dtype)
    if launch.mode == "grouped":
        from .readout_grouped import RoutedReadoutGrouped, check_backward
        check_backward(launch, q.shape[-1], F.shape[-1])
        return RoutedReadoutGrouped.apply(q, F, idx, p, local, float(scale), inverse, launch,
                                          bthk)
    long = RoutedReadoutTriton.apply(q if scale == 1.0 else q * scale, F, idx, p, launch)
    return long if local is None else long.add_(local).to(local.dtype)

"""Routed readout grouped by SLOT (the MoE layout), forward and backward in Triton:

    long_t = Σ_k p_tk (q_t F_{idx_tk})

Why: the query-tile kernels (readout_triton.py) multiply a whole BT-row tile by every slot any
row picked; with scattered routing that union nears S and the cost nears the dense O(T·S·d²).
Grouped by slot, every (t, k) entry costs exactly one row-times-F product: O(T·k·d²) total,
and each F_j is read once per block of BE entries that picked it.

  index  (PyTorch, no host sync) one stable sort of the T·k entries by slot -> `order`,
         `starts` [BH, S+1]; each slot's run is cut into blocks of BE entries; blk_slot / blk_e0
         map a program to (slot, first entry). The entries with idx = -1 form a pseudo-slot S
         whose programs write zero rows. The grid is the upper bound cdiv(T·k, BE) + S + 1;
         programs past the last block exit at once.
  fwd    grid (NB, cdiv(V, BV), BH): Y[e] = w_e · (q_{t(e)} F_j) for the block's entries
         (w = scale · p), one row of a [BH, T·k, V] buffer per entry (no two programs write the
         same row: deterministic); then one pass (`sum_picks`) writes Σ_k Y (+ local) in the
         output dtype.
  bwd    (default with 16-bit products and K, V <= 128) one pass, grid (segments, BH): a
         program owns one segment of a slot's run (as the dF partials), loads F_j once and per
         block of entries gathers q_t and do_t once for dp_e = (q_t F_j)·do_t,
         DQ[e] = w_e · do_t F_jᵀ and the partial dF_j += (w_e q_t)ᵀ do_t; dq = Σ_k DQ
         (`sum_picks`), dF = per-slot sum of the partials in order (deterministic).
         Else two passes: dq/dp grid (NB, BH) as the forward, then
         readout_triton.routed_readout_dF (per segment, then per slot).
  do     is read as it arrives: with `local` (the bsbr_attention path) it is the 16-bit
         gradient of the 16-bit output, so a float32 copy would only double its gathers.
q, do, local, the output and dq lie in either layout (layout.py, BTHK); the Y / DQ buffers are
head-major. The buffers are float32 for float32 inputs and q's dtype otherwise (T·k·d elements: at
T = 32k, k = 8, d = 128 that is 64 MiB per head in bf16), alive only inside the call.

Precision of the products ("lowp", `ReadoutLaunch.products`): by default, for bf16 inputs F is
cast to bf16 once per call and the fwd and dq/dp products run bf16 × bf16 on the tensor cores
(float32 accumulation); otherwise they run on float32 F (tf32 for fp16 inputs, "ieee" for
float32). Why: these two passes' main traffic is F, re-read once per block of BE entries (~8.6 GB
at T = 32k, H16, D128 in float32); with bf16 F it halves. fp16 keeps float32 F by default
(F = KᵀV over a chunk can pass fp16's 65504); `products="16bit"` takes 16-bit F for fp16 too
(how the interpreter tests run these products: it cannot run bf16).
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..launch import dot_precision, pow2_tile
from .launch import RUNTIME_SIZES as SIZES
from .launch import ReadoutLaunch
from .layout import empty_as, stored_as, token_rows
from .readout_triton import (_bv, inverse_index, routed_readout_dF, slot_runs, slot_segments,
                             sum_dF_segments)


def use_lowp(launch: ReadoutLaunch, dtype: torch.dtype) -> bool:
    """Whether the products run on F cast to ``dtype`` (see the module docstring)."""
    if launch.products == "auto":
        return dtype == torch.bfloat16
    return launch.products == "16bit" and dtype in (torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=SIZES)
def _grouped_fwd(q, F, p, order, blk_slot, blk_e0, blk_e1, Y, H, T, S, NK, NB,
                 K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, BTHK: tl.constexpr):
    i_b, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    j = tl.load(blk_slot + bh * NB + i_b).to(tl.int64)
    if j <= S:                      # j = S: the entries with no slot: weight 0, rows get 0
        b_real = (j < S).to(tl.float32)
        e0 = tl.load(blk_e0 + bh * NB + i_b)
        e1 = tl.load(blk_e1 + bh * NB + i_b)
        q, sq = token_rows(q, bh, H, T, K, BTHK)
        F += (bh * S + tl.minimum(j, S - 1)) * K * V
        p += bh * T * NK
        order += bh * T * NK
        Y += bh * T * NK * V
        o_e = e0 + tl.arange(0, BE)
        m_e = o_e < e1
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        b_ent = tl.load(order + o_e, mask=m_e, other=0)      # flat t·NK + k of each entry
        b_w = tl.load(p + b_ent, mask=m_e, other=0.) * b_real
        o_t = b_ent // NK
        b_q = tl.load(q + o_t[:, None] * sq + o_k[None, :],
                      mask=m_e[:, None] & (o_k[None, :] < K), other=0.).to(tl.float32)
        b_F = tl.load(F + o_k[:, None] * V + o_v[None, :],
                      mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
        b_a = b_q * b_w[:, None]
        if LOWP:                    # F is already 16-bit: a 16-bit product, fp32 accumulation
            b_y = tl.dot(b_a.to(F.dtype.element_ty), b_F)
        else:
            b_y = tl.dot(b_a, b_F, input_precision=PREC)
        tl.store(Y + b_ent[:, None].to(tl.int64) * V + o_v[None, :], b_y.to(Y.dtype.element_ty),
                 mask=m_e[:, None] & (o_v[None, :] < V))


@triton.jit
def _bwd_bases(F, p, dp, order, DQ, bh, j, T, S, NK, K, V):
    """The (b, h) rows of the backward's own buffers, and slot j's F (slot S, the entries with
    no pick, reads slot S − 1 under a zero weight). q and do: `token_rows`."""
    return (F + (bh * S + tl.minimum(j, S - 1)) * K * V, p + bh * T * NK, dp + bh * T * NK,
            order + bh * T * NK, DQ + bh * T * NK * K)


@triton.jit(do_not_specialize=SIZES)
def _grouped_bwd_q(q, F, p, do, order, blk_slot, blk_e0, blk_e1, DQ, dp, H, T, S, NK, NB,
                   K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr, BTHK: tl.constexpr):
    i_b, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    j = tl.load(blk_slot + bh * NB + i_b).to(tl.int64)
    if j <= S:
        b_real = (j < S).to(tl.float32)
        e0 = tl.load(blk_e0 + bh * NB + i_b)
        e1 = tl.load(blk_e1 + bh * NB + i_b)
        F, p, dp, order, DQ = _bwd_bases(F, p, dp, order, DQ, bh, j, T, S, NK, K, V)
        q, sq = token_rows(q, bh, H, T, K, BTHK)
        do, sdo = token_rows(do, bh, H, T, V, BTHK)
        o_e = e0 + tl.arange(0, BE)
        m_e = o_e < e1
        o_k = tl.arange(0, BK)
        m_ek = m_e[:, None] & (o_k[None, :] < K)
        b_ent = tl.load(order + o_e, mask=m_e, other=0)
        b_w = tl.load(p + b_ent, mask=m_e, other=0.) * b_real
        o_t = b_ent // NK
        b_q = tl.load(q + o_t[:, None] * sq + o_k[None, :], mask=m_ek, other=0.).to(tl.float32)
        b_g = tl.zeros([BE], tl.float32)
        b_dq = tl.zeros([BE, BK], tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            b_F = tl.load(F + o_k[:, None] * V + o_v[None, :],
                          mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
            b_do = tl.load(do + o_t[:, None] * sdo + o_v[None, :],
                           mask=m_e[:, None] & (o_v[None, :] < V), other=0.).to(tl.float32)
            if LOWP:
                b_g += tl.sum(tl.dot(b_q.to(F.dtype.element_ty), b_F) * b_do, 1)
                b_dq += tl.dot(b_do.to(F.dtype.element_ty), tl.trans(b_F))
            else:
                b_g += tl.sum(tl.dot(b_q, b_F, input_precision=PREC) * b_do, 1)  # (q_t F_j)·do_t
                b_dq += tl.dot(b_do, tl.trans(b_F), input_precision=PREC)
        tl.store(dp + b_ent, b_g * b_real, mask=m_e)
        tl.store(DQ + b_ent[:, None].to(tl.int64) * K + o_k[None, :],
                 (b_dq * b_w[:, None]).to(DQ.dtype.element_ty), mask=m_ek)


@triton.jit(do_not_specialize=SIZES)
def _grouped_bwd_fused(q, F, p, do, order, seg_slot, seg_e0, seg_e1, DQ, dp, P, H, T, S, NK,
                       NSEG, K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                       LOWP: tl.constexpr, BTHK: tl.constexpr):
    """The dq/dp and dF passes in one: a program owns one segment of slot j's entries, loads
    F_j once, and for each block of BE entries gathers q_t, do_t once for all three products:
    dp_e = (q_t F_j)·do_t, DQ_e = p_e do_t F_jᵀ, partial dF_j += (p_e q_t)ᵀ do_t. Whole K and V
    in one tile (≤ 128). The pseudo-slot S (idx = -1) writes zero dp and DQ rows."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    j = tl.load(seg_slot + bh * NSEG + i_s).to(tl.int64)
    if j <= S:                      # j = S + 1: spare program
        b_real = (j < S).to(tl.float32)
        e_lo = tl.load(seg_e0 + bh * NSEG + i_s)
        e_hi = tl.load(seg_e1 + bh * NSEG + i_s)
        F, p, dp, order, DQ = _bwd_bases(F, p, dp, order, DQ, bh, j, T, S, NK, K, V)
        q, sq = token_rows(q, bh, H, T, K, BTHK)
        do, sdo = token_rows(do, bh, H, T, V, BTHK)
        o_k = tl.arange(0, BK)
        o_v = tl.arange(0, BV)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        b_F = tl.load(F + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
        b_dF = tl.zeros([BK, BV], tl.float32)
        for e0 in range(e_lo, e_hi, BE):
            o_e = e0 + tl.arange(0, BE)
            m_e = o_e < e_hi
            m_ek = m_e[:, None] & (o_k[None, :] < K)
            b_ent = tl.load(order + o_e, mask=m_e, other=0)
            o_t = b_ent // NK
            b_w = tl.load(p + b_ent, mask=m_e, other=0.) * b_real
            b_q = tl.load(q + o_t[:, None] * sq + o_k[None, :], mask=m_ek, other=0.)
            b_do = tl.load(do + o_t[:, None] * sdo + o_v[None, :],
                           mask=m_e[:, None] & (o_v[None, :] < V), other=0.)
            b_a = b_q.to(tl.float32) * b_w[:, None]
            if LOWP:                # F is 16-bit: 16-bit operands, float32 accumulation
                b_qF = tl.dot(b_q.to(F.dtype.element_ty), b_F)
                b_dq = tl.dot(b_do.to(F.dtype.element_ty), tl.trans(b_F))
                b_dF += tl.dot(tl.trans(b_a.to(F.dtype.element_ty)), b_do.to(F.dtype.element_ty))
            else:
                b_qF = tl.dot(b_q.to(tl.float32), b_F, input_precision=PREC)
                b_dq = tl.dot(b_do.to(tl.float32), tl.trans(b_F), input_precision=PREC)
                b_dF += tl.dot(tl.trans(b_a), b_do.to(tl.float32), input_precision=PREC)
            tl.store(dp + b_ent, tl.sum(b_qF * b_do.to(tl.float32), 1) * b_real, mask=m_e)
            tl.store(DQ + b_ent[:, None].to(tl.int64) * K + o_k[None, :],
                     (b_dq * b_w[:, None]).to(DQ.dtype.element_ty), mask=m_ek)
        if j < S:
            tl.store(P + (bh * NSEG + i_s) * K * V + o_k[:, None] * V + o_v[None, :], b_dF,
                     mask=m_kv)


FUSED_MAX_DIM = 128     # whole-K and whole-V tiles of the fused backward (registers)
# A per-process memo of failures, not a choice: the one-pass launches (head dims, dtypes, block,
# warps, device) that raised Triton's OutOfResources (e.g. too little shared memory on this
# GPU). Those calls take the two-pass backward without trying (and warning) again.
_FUSED_UNFIT: set = set()


def check_backward(launch: ReadoutLaunch, K: int, V: int) -> None:
    """A one-pass backward asked for explicitly must fit its whole-K, whole-V tiles."""
    if launch.backward == "one_pass" and max(K, V) > FUSED_MAX_DIM:
        raise ValueError(f"ReadoutLaunch.backward: 'one_pass' takes K, V <= {FUSED_MAX_DIM}, "
                         f"got K={K}, V={V} (use 'auto' or 'two_pass')")


def use_fused_bwd(launch: ReadoutLaunch, K: int, V: int, lowp: bool) -> bool:
    """Whether the backward runs _grouped_bwd_fused: "auto" with 16-bit products (F 16-bit: its
    tile and the operands stay well inside shared memory) and K, V <= FUSED_MAX_DIM. Why: the
    separate dq/dp and dF passes each gather the q and do rows of every entry (~2.1 GB each at
    32k, H16, D128, k 8, 16-bit); one pass gathers them once."""
    check_backward(launch, K, V)
    if launch.backward == "auto":
        return max(K, V) <= FUSED_MAX_DIM and lowp
    return launch.backward == "one_pass"


def fused_backward(q, Fk, p, do, order, starts, DQ, dp, F_dtype, lowp, launch: ReadoutLaunch,
                   bthk=False):
    """dp and DQ (written in place) and dF of the one-pass backward; None when this launch does
    not fit the GPU (then remembered, and the caller runs the two passes)."""
    B, H, T, K = q.shape
    S, V, NK = Fk.shape[2], Fk.shape[4], p.shape[3]
    be, warps = launch.fused_block, launch.fused_warps
    key = (K, V, q.dtype, Fk.dtype, be, warps, str(q.device))
    if key in _FUSED_UNFIT:
        return None
    seg, s0, s1, NSEG, seg_end, seg_n = slot_segments(order, starts, S, T * NK)
    P = torch.empty(B * H, NSEG, K, V, dtype=torch.float32, device=q.device)
    try:
        _grouped_bwd_fused[(NSEG, B * H)](
            q, Fk, p, do, order, seg, s0, s1, DQ, dp, P, H, T, S, NK, NSEG, K=K, V=V, BE=be,
            BK=pow2_tile(K, FUSED_MAX_DIM), BV=pow2_tile(V, FUSED_MAX_DIM),
            PREC=dot_precision(q.dtype), LOWP=lowp, BTHK=bthk, num_warps=warps)
    except OutOfResources as exc:
        _FUSED_UNFIT.add(key)
        warnings.warn(f"BSBR readout: the one-pass backward does not fit this GPU at {key} "
                      f"({exc}); using the two-pass backward", RuntimeWarning, stacklevel=3)
        return None
    return sum_dF_segments(P, seg_end, seg_n, Fk.shape, F_dtype)


@triton.jit(do_not_specialize=SIZES)
def _sum_picks(X, add, out, R, NK, H, T, D, HAS_ADD: tl.constexpr, BTHK: tl.constexpr,
               BR: tl.constexpr, BD: tl.constexpr):
    """out[r] = add[r] + Σ_k X[r, k] (float32 sums, stored in out's dtype); X [R, NK, D] with
    R = B·H·T rows head-major; out and add [B,H,T,D] stored token-major when BTHK."""
    i_r, i_d = tl.program_id(0), tl.program_id(1)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    if BTHK:                                # row r = (b·H + h)·T + t  ->  (b·T + t)·H + h
        o_bh = o_r // T
        o_o = ((o_bh // H) * T + o_r % T) * H + o_bh % H
    else:
        o_o = o_r
    o_d = i_d * BD + tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    acc = tl.zeros([BR, BD], tl.float32)
    if HAS_ADD:
        acc += tl.load(add + o_o[:, None] * D + o_d[None, :], mask=m, other=0.).to(tl.float32)
    for k in range(0, NK):
        acc += tl.load(X + (o_r[:, None] * NK + k) * D + o_d[None, :], mask=m,
                       other=0.).to(tl.float32)
    tl.store(out + o_o[:, None] * D + o_d[None, :], acc.to(out.dtype.element_ty), mask=m)


def sum_picks(X, dtype, add=None, bthk=False):
    """Σ over dim 3 of X [B,H,T,k,D] (+ add [B,H,T,D]) in one pass, as `dtype`; the result
    (and add) stored token-major when ``bthk`` (layout.py). Why not `X.sum(3, dtype=float32)`
    (+ add, then .to): that writes and re-reads a float32 [B,H,T,D] (and the add a second
    one); at 32k, H16, D128 each pass is ~0.27 GB."""
    B, H, T, NK, D = X.shape
    out = empty_as(B, H, T, D, bthk, dtype=dtype, device=X.device)
    R = B * H * T
    BR, BD = 32, min(128, max(16, triton.next_power_of_2(D)))
    a = stored_as(add, bthk) if add is not None else X
    _sum_picks[(triton.cdiv(R, BR), triton.cdiv(D, BD))](X, a, out, R, NK, H, T, D,
                                                        HAS_ADD=add is not None, BTHK=bthk,
                                                        BR=BR, BD=BD)
    return out


class RoutedReadoutGrouped(torch.autograd.Function):
    """out = [local +] scale · Σ_k p q F_idx. With `local` the sum over the k picks, the scale
    and the add run in one pass that writes out in local's dtype, and the backward hands the
    incoming 16-bit gradient to every kernel as it is (no float32 copy of do: for 16-bit
    outputs it holds no more than 16 bits anyway)."""

    @staticmethod
    def forward(ctx, q, F, idx, p, local, scale, inverse, launch, bthk):
        q, F = stored_as(q, bthk), F.contiguous()
        idx = idx.to(torch.int32).contiguous()
        p32 = p.to(torch.float32)
        # The scale rides on the weights (the [T, k] tensor), never on a copy of q.
        p32 = (p32 * scale if scale != 1.0 else p32).contiguous()
        B, H, T, K = q.shape
        S, V, NK = F.shape[2], F.shape[4], idx.shape[3]
        be, warps, BVf = launch.block, launch.warps, pow2_tile(V, launch.block_v)
        order, starts = inverse_index(idx, S, inverse)
        slot, e0, e1, NB, _, _ = slot_runs(order, starts, S, T * NK, be)
        buf_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        Y = torch.empty(B, H, T, NK, V, dtype=buf_dtype, device=q.device)
        BK = pow2_tile(K, 256)
        lowp = use_lowp(launch, q.dtype)
        Fk = F.to(q.dtype) if lowp else F            # the operand both product kernels read
        _grouped_fwd[(NB, triton.cdiv(V, BVf), B * H)](
            q, Fk, p32, order, slot, e0, e1, Y, H, T, S, NK, NB, K=K, V=V, BE=be, BK=BK,
            BV=BVf, PREC=dot_precision(q.dtype), LOWP=lowp, BTHK=bthk, num_warps=warps)
        if local is None:
            out = sum_picks(Y, torch.float32, bthk=bthk)
        else:
            out = sum_picks(Y, local.dtype, add=local, bthk=bthk)
        ctx.save_for_backward(q, Fk, idx, p32, order, starts, slot, e0, e1)
        ctx.NB, ctx.p_dtype, ctx.F_dtype, ctx.lowp = NB, p.dtype, F.dtype, lowp
        ctx.scale, ctx.has_local, ctx.launch, ctx.bthk = scale, local is not None, launch, bthk
        return out

    @staticmethod
    def backward(ctx, do):
        q, Fk, idx, p, order, starts, slot, e0, e1 = ctx.saved_tensors
        bthk = ctx.bthk
        do = stored_as(do, bthk)
        B, H, T, K = q.shape
        S, V, NK = Fk.shape[2], Fk.shape[4], idx.shape[3]
        launch = ctx.launch
        BK, BV = pow2_tile(K, 256), _bv(V)
        meta = dict(K=K, V=V, BK=BK, BV=BV, PREC=dot_precision(q.dtype))
        buf_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        DQ = torch.empty(B, H, T, NK, K, dtype=buf_dtype, device=q.device)
        dp = torch.empty(B, H, T, NK, dtype=torch.float32, device=q.device)
        dF = None
        if use_fused_bwd(launch, K, V, ctx.lowp):
            dF = fused_backward(q, Fk, p, do, order, starts, DQ, dp, ctx.F_dtype, ctx.lowp,
                                launch, bthk)
        if dF is None:
            _grouped_bwd_q[(ctx.NB, B * H)](q, Fk, p, do, order, slot, e0, e1, DQ, dp, H, T, S,
                                            NK, ctx.NB, BE=launch.block, LOWP=ctx.lowp,
                                            BTHK=bthk, num_warps=launch.warps, **meta)
            dF = routed_readout_dF(q, p, do, order, starts, Fk.shape, ctx.F_dtype,
                                   dict(K=K, V=V, BK=BK, PREC=dot_precision(q.dtype)), launch,
                                   lowp=ctx.lowp, bthk=bthk)
        dq = sum_picks(DQ, q.dtype, bthk=bthk)
        if ctx.scale != 1.0:
            dp = dp * ctx.scale                       # p carried the scale in every product
        d_local = do if ctx.has_local else None
        return dq, dF, None, dp.to(ctx.p_dtype), d_local, None, None, None, None

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
  fwd    grid (NB, cdiv(V, BV), BH): Y[e] = p_e · (q_{t(e)} F_j) for the block's entries, one row
         of a [BH, T·k, V] buffer per entry (no two programs write the same row: deterministic);
         long = Σ_k Y in PyTorch.
  dq/dp  grid (NB, BH): dp_e = (q_t F_j)·do_t, DQ[e] = p_e · do_t F_jᵀ; dq = Σ_k DQ.
  dF     readout_triton.routed_readout_dF: per segment of a slot's run, then per slot in order
         (deterministic).
The buffers are float32 for float32 inputs and q's dtype otherwise (T·k·d elements: at
T = 32k, k = 8, d = 128 that is 64 MiB per head in bf16), alive only inside the call.

Precision of the products ("lowp"): for bf16 inputs F is cast to bf16 once per call and the
fwd and dq/dp products run bf16 × bf16 on the tensor cores (float32 accumulation); otherwise
they run on float32 F (tf32 for fp16 inputs, "ieee" for float32). Why: the H200 profile at
T = 32k (BENCHMARKS.md, 2026-11-29) put these two passes at 2.6 + 4.5 ms, and their main
traffic is F, re-read once per block of BE entries (~8.6 GB at 32k in float32). Expected from
bf16 F: that traffic and the MMA time halve, about −3 ms at 32k. Measured only together with the
Triton top-k routing (12-04, H200): −6.5 ms at 32k for both.
fp16 keeps float32 F by default (F = KᵀV over a chunk can pass fp16's 65504); `GROUPED_READOUT`
pins the choice (benchmarks A/B it in one process; tests force it for fp16 under the
interpreter, where bf16 cannot run).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .readout_triton import _bv, _inverse_index, _prec, routed_readout_dF, slot_runs

BE = 64          # entries per program (the H200 sweep of 12-04 at 32k: 64 > 128 > 32)

# {"lowp": True/False} pins the product precision above (empty: bf16 inputs only);
# "block" (entries per program), "warps" and "bv" (the forward's V tile) pin the fwd and dq/dp
# launch (launch_config).
GROUPED_READOUT: dict = {}


def use_lowp(dtype: torch.dtype) -> bool:
    """Whether the products run on F cast to ``dtype`` (see the module docstring)."""
    pin = GROUPED_READOUT.get("lowp")
    if pin is None:
        return dtype == torch.bfloat16
    return bool(pin) and dtype in (torch.float16, torch.bfloat16)


@triton.jit
def _grouped_fwd(q, F, p, order, blk_slot, blk_e0, blk_e1, Y, T, S, NK, NB,
                 K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    i_b, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    j = tl.load(blk_slot + bh * NB + i_b).to(tl.int64)
    if j <= S:                      # j = S: the entries with no slot: weight 0, rows get 0
        b_real = (j < S).to(tl.float32)
        e0 = tl.load(blk_e0 + bh * NB + i_b)
        e1 = tl.load(blk_e1 + bh * NB + i_b)
        q += bh * T * K
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
        b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_e[:, None] & (o_k[None, :] < K),
                      other=0.).to(tl.float32)
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
def _grouped_bwd_q(q, F, p, do, order, blk_slot, blk_e0, blk_e1, DQ, dp, T, S, NK, NB,
                   K: tl.constexpr, V: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    i_b, i_bh = tl.program_id(0), tl.program_id(1)
    bh = i_bh.to(tl.int64)
    j = tl.load(blk_slot + bh * NB + i_b).to(tl.int64)
    if j <= S:
        b_real = (j < S).to(tl.float32)
        e0 = tl.load(blk_e0 + bh * NB + i_b)
        e1 = tl.load(blk_e1 + bh * NB + i_b)
        q += bh * T * K
        F += (bh * S + tl.minimum(j, S - 1)) * K * V
        p += bh * T * NK
        dp += bh * T * NK
        do += bh * T * V
        order += bh * T * NK
        DQ += bh * T * NK * K
        o_e = e0 + tl.arange(0, BE)
        m_e = o_e < e1
        o_k = tl.arange(0, BK)
        m_ek = m_e[:, None] & (o_k[None, :] < K)
        b_ent = tl.load(order + o_e, mask=m_e, other=0)
        b_w = tl.load(p + b_ent, mask=m_e, other=0.) * b_real
        o_t = b_ent // NK
        b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_ek, other=0.).to(tl.float32)
        b_g = tl.zeros([BE], tl.float32)
        b_dq = tl.zeros([BE, BK], tl.float32)
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            b_F = tl.load(F + o_k[:, None] * V + o_v[None, :],
                          mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
            b_do = tl.load(do + o_t[:, None] * V + o_v[None, :],
                           mask=m_e[:, None] & (o_v[None, :] < V), other=0.)
            if LOWP:
                b_g += tl.sum(tl.dot(b_q.to(F.dtype.element_ty), b_F) * b_do, 1)
                b_dq += tl.dot(b_do.to(F.dtype.element_ty), tl.trans(b_F))
            else:
                b_g += tl.sum(tl.dot(b_q, b_F, input_precision=PREC) * b_do, 1)  # (q_t F_j)·do_t
                b_dq += tl.dot(b_do, tl.trans(b_F), input_precision=PREC)
        tl.store(dp + b_ent, b_g * b_real, mask=m_e)
        tl.store(DQ + b_ent[:, None].to(tl.int64) * K + o_k[None, :],
                 (b_dq * b_w[:, None]).to(DQ.dtype.element_ty), mask=m_ek)


def launch_config(V: int) -> tuple[int, int, int]:
    """(entries per program, num_warps, V tile of the forward) of the fwd and dq/dp kernels: the
    defaults, or the pins "block" / "warps" / "bv" of GROUPED_READOUT (bench_bsbr sweeps them).
    Why a whole-V forward tile is worth trying: with BV < V every V slice re-gathers the block's
    q rows (at 32k, H16, D128 and BV = 64 that is ~2 GB of gathers per forward)."""
    be, warps = GROUPED_READOUT.get("block", BE), GROUPED_READOUT.get("warps", 4)
    bv = GROUPED_READOUT.get("bv", _bv(V))
    if be not in (16, 32, 64, 128):
        raise ValueError(f"GROUPED_READOUT['block']: expected 16, 32, 64 or 128, got {be!r}")
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"GROUPED_READOUT['warps']: expected a power of two <= 16, got {warps!r}")
    if bv not in (16, 32, 64, 128, 256):
        raise ValueError(f"GROUPED_READOUT['bv']: expected a power of two in 16..256, got {bv!r}")
    return be, warps, min(bv, max(16, triton.next_power_of_2(V)))


class RoutedReadoutGrouped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, F, idx, p):
        q, F = q.contiguous(), F.contiguous()
        idx = idx.to(torch.int32).contiguous()
        p32 = p.to(torch.float32).contiguous()
        B, H, T, K = q.shape
        S, V, NK = F.shape[2], F.shape[4], idx.shape[3]
        be, warps, BVf = launch_config(F.shape[4])
        order, starts = _inverse_index(idx, S)
        slot, e0, e1, NB, _, _ = slot_runs(order, starts, S, T * NK, be)
        buf_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        Y = torch.empty(B, H, T, NK, V, dtype=buf_dtype, device=q.device)
        BK = max(16, triton.next_power_of_2(K))
        lowp = use_lowp(q.dtype)
        Fk = F.to(q.dtype) if lowp else F            # the operand both product kernels read
        _grouped_fwd[(NB, triton.cdiv(V, BVf), B * H)](
            q, Fk, p32, order, slot, e0, e1, Y, T, S, NK, NB, K=K, V=V, BE=be, BK=BK, BV=BVf,
            PREC=_prec(q.dtype), LOWP=lowp, num_warps=warps)
        out = Y.sum(3, dtype=torch.float32)                    # Σ over the k picks, in fp32
        ctx.save_for_backward(q, Fk, idx, p32, order, starts, slot, e0, e1)
        ctx.NB, ctx.p_dtype, ctx.F_dtype, ctx.lowp = NB, p.dtype, F.dtype, lowp
        ctx.be, ctx.warps = be, warps
        return out

    @staticmethod
    def backward(ctx, do):
        q, Fk, idx, p, order, starts, slot, e0, e1 = ctx.saved_tensors
        do = do.to(torch.float32).contiguous()
        B, H, T, K = q.shape
        S, V, NK = Fk.shape[2], Fk.shape[4], idx.shape[3]
        BK, BV = max(16, triton.next_power_of_2(K)), _bv(V)
        meta = dict(K=K, V=V, BK=BK, BV=BV, PREC=_prec(q.dtype))
        buf_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
        DQ = torch.empty(B, H, T, NK, K, dtype=buf_dtype, device=q.device)
        dp = torch.empty(B, H, T, NK, dtype=torch.float32, device=q.device)
        _grouped_bwd_q[(ctx.NB, B * H)](q, Fk, p, do, order, slot, e0, e1, DQ, dp, T, S, NK,
                                        ctx.NB, BE=ctx.be, LOWP=ctx.lowp,
                                        num_warps=ctx.warps, **meta)
        dq = DQ.sum(3, dtype=torch.float32).to(q.dtype)
        dF = routed_readout_dF(q, p, do, order, starts, Fk.shape, ctx.F_dtype,
                               dict(K=K, V=V, BK=BK, PREC=_prec(q.dtype)))
        return dq, dF, None, dp.to(ctx.p_dtype)

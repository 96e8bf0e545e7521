"""Chunk states F_j = K_jᵀ V_j in Triton, forward and backward, so 16-bit inputs get float32
states from tensor-core products with float32 accumulation (PyTorch would either round F to
bf16 or run a slow float32 matmul).

  fwd   grid (nC, cdiv(V, BV), B·H): F_j[:, v-slice] = Σ over the chunk's BT-row blocks of
        K_blkᵀ V_blk
  bwd   grid (nC·cdiv(C, BT), B·H): per BT rows of a chunk, dK = V dF_jᵀ and dV = K dF_j,
        looping over V in BV slices (dF stays float32; the products run in float32, "ieee" for
        float32 inputs, tf32 otherwise).
BT, BV and the warps come from a `StatesLaunch`. k, v and their gradients lie in either layout
(layout.py, BTHK); F is [B,H,nC,K,V].
Only complete chunks (the first nC·C keys) are read; keys past them get zero gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_precision, pow2_tile
from .launch import RUNTIME_SIZES as SIZES
from .launch import StatesLaunch
from .layout import empty_as, stored_as, token_rows


@triton.jit(do_not_specialize=SIZES)
def _states_fwd(k, v, F, H, T, C, nC,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr, BTHK: tl.constexpr):
    i_c, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = i_bh.to(tl.int64)
    k, sk = token_rows(k, bh, H, T, K, BTHK)
    v, sv = token_rows(v, bh, H, T, V, BTHK)
    F += (bh * nC + i_c) * K * V
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    b_F = tl.zeros([BK, BV], tl.float32)
    c0 = i_c * C
    for t0 in range(0, C, BT):
        o_t = c0 + t0 + tl.arange(0, BT)
        m_t = o_t < c0 + C
        b_kt = tl.load(k + o_t[None, :] * sk + o_k[:, None],
                       mask=m_t[None, :] & (o_k[:, None] < K), other=0.)
        b_v = tl.load(v + o_t[:, None] * sv + o_v[None, :],
                      mask=m_t[:, None] & (o_v[None, :] < V), other=0.)
        b_F += tl.dot(b_kt, b_v, input_precision=PREC)
    tl.store(F + o_k[:, None] * V + o_v[None, :], b_F, mask=(o_k[:, None] < K) & (o_v[None, :] < V))


@triton.jit(do_not_specialize=SIZES)
def _states_bwd(k, v, dF, dk, dv, H, T, C, nC, NTC,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr, BTHK: tl.constexpr):
    i_ct, i_bh = tl.program_id(0), tl.program_id(1)
    i_c = i_ct // NTC
    bh = i_bh.to(tl.int64)
    k, sk = token_rows(k, bh, H, T, K, BTHK)
    dk, sdk = token_rows(dk, bh, H, T, K, BTHK)
    v, sv = token_rows(v, bh, H, T, V, BTHK)
    dv, sdv = token_rows(dv, bh, H, T, V, BTHK)
    dF += (bh * nC + i_c) * K * V
    o_t = i_c * C + (i_ct % NTC) * BT + tl.arange(0, BT)
    m_t = o_t < i_c * C + C
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k[None, :] < K)
    b_k = tl.load(k + o_t[:, None] * sk + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
    b_dk = tl.zeros([BT, BK], tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        b_dF = tl.load(dF + o_k[:, None] * V + o_v[None, :],
                       mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.)
        b_v = tl.load(v + o_t[:, None] * sv + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_dk += tl.dot(b_v, tl.trans(b_dF), input_precision=PREC)
        b_dv = tl.dot(b_k, b_dF, input_precision=PREC)
        tl.store(dv + o_t[:, None] * sdv + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
    tl.store(dk + o_t[:, None] * sdk + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)


def _meta(k, v, C, launch: StatesLaunch, bthk):
    """Whole K per tile; BT rows per product (capped at the padded C) and V in BV slices."""
    K, V = k.shape[-1], v.shape[-1]
    return dict(K=K, V=V, BT=pow2_tile(C, launch.block_t),
                BK=max(16, triton.next_power_of_2(K)), BV=pow2_tile(V, launch.block_v),
                PREC=dot_precision(k.dtype), BTHK=bthk, num_warps=launch.warps)


class ChunkStatesTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, chunk_size, launch, bthk):
        k, v = stored_as(k, bthk), stored_as(v, bthk)
        B, H, T, K = k.shape
        V = v.shape[-1]
        nC = T // chunk_size
        meta = _meta(k, v, chunk_size, launch, bthk)
        F = torch.empty(B, H, nC, K, V, dtype=torch.float32, device=k.device)
        if nC:
            _states_fwd[(nC, triton.cdiv(V, meta["BV"]), B * H)](
                k, v, F, H, T, chunk_size, nC, **meta)
        ctx.save_for_backward(k, v)
        ctx.chunk_size, ctx.launch, ctx.bthk = chunk_size, launch, bthk
        return F

    @staticmethod
    def backward(ctx, dF):
        k, v = ctx.saved_tensors
        C, bthk = ctx.chunk_size, ctx.bthk
        B, H, T, K = k.shape
        nC = T // C
        dF = dF.to(torch.float32).contiguous()
        meta = _meta(k, v, C, ctx.launch, bthk)
        # rows past the last complete chunk are no input of F: zero gradient
        dk, dv = (empty_as(*t.shape, bthk, dtype=t.dtype, device=t.device).zero_()
                  for t in (k, v))
        NTC = triton.cdiv(C, meta["BT"])
        if nC:
            _states_bwd[(nC * NTC, B * H)](k, v, dF, dk, dv, H, T, C, nC, NTC, **meta)
        return dk, dv, None, None, None


def chunk_states_triton(k, v, hk, *, chunk_size, launch: StatesLaunch = StatesLaunch(),
                        bthk=False):
    """(F [B,H,nC,K,V] float32, h [B,H,nC,M] float32) of the complete chunks; F by the Triton
    kernels at ``launch``'s tiles, h (a mean, memory-bound) in PyTorch. k, v, hk are
    [B,H,T,·] views, stored token-major when ``bthk`` (layout.py). Differentiable in k, v,
    hk."""
    B, H, T, M = hk.shape
    nC = T // chunk_size
    F = ChunkStatesTriton.apply(k, v, chunk_size, launch, bthk)
    h = hk[:, :, :nC * chunk_size].float().reshape(B, H, nC, chunk_size, M).mean(3)
    return F, h

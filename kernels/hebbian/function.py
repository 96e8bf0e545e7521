"""The autograd Function over the chunked Triton kernels (chunk_state.py, chunk_output.py,
chunk_grad.py), walking the sequence in segments so that memory stays bounded at any length.

Per-chunk states are K·V values each (8 MiB per head in float32 at BDH's K=8192, V=256), so the
whole sequence's chunk states are never held at once. The sequence is cut into segments of at
most SEGMENT_TOKENS tokens, sized so one segment's chunk-state buffer stays under
SEGMENT_BYTES. The forward carries the float32 state from segment to segment and saves only
the states at segment boundaries; the backward walks the segments in reverse, recomputes each
segment's chunk states from its boundary state, and carries dL/dS backwards the same way.
"""
from __future__ import annotations

import math

import torch

from . import chunk_grad, chunk_output, chunk_state
from ..launch import INTERPRET
from .launches import ChunkLaunch
from .plan import default_chunk_launch, fused_needs_atomics, plan as make_plan

SEGMENT_TOKENS = 16384
MAX_GRID_BH = 65535              # B·H rides on a grid axis whose limit is 65535
SEGMENT_BYTES = 1 << 30          # per buffer (h in the forward; h and dh in the backward)


def _segment_tokens(B, H, K, V, elt, bts) -> int:
    """Tokens per segment: one buffer of chunk states (at the smaller chunk of ``bts``) stays
    under SEGMENT_BYTES; a multiple of every chunk in ``bts`` (the forward and the backward
    must cut the sequence at the same places, even with different chunk sizes)."""
    lo, hi = min(bts), max(bts)
    n = min(SEGMENT_TOKENS, max(1, SEGMENT_BYTES // (B * H * K * V * elt)) * lo)
    return max(hi, n // hi * hi)


def _segments(T, seg, BT):
    """(t0, number of BT-chunks) for each segment of ``seg`` tokens."""
    return [(t0, math.ceil(min(seg, T - t0) / BT)) for t0 in range(0, T, seg)]


def _log2_decay(decay):
    return None if decay is None else torch.log2(decay.detach().float()).contiguous()


def _decay_grad(q, k, dq, dk, decay, final, dht, strict):
    """dL/dγ [H] from the gradients the kernels already produced, without a kernel of its own.

    Every term of o_t and of S_final carries γ to the power (query index − key index): the
    query index is t (strict) or t+1 (inclusive) for o_t and T for S_final; the key index is
    s+1 for k_s and 0 for the initial state. Differentiating in a = log γ therefore weighs each
    term by that difference, and the sums over terms are exactly q_t·dL/dq_t, k_s·dL/dk_s and
    ⟨dL/dS_final, S_final⟩:

        dL/da = Σ_t i_q(t) (q_t · dq_t) − Σ_s (s+1) (k_s · dk_s) + T ⟨dS_final, S_final⟩

    and dL/dγ = (dL/da) / γ. Sums over batch, time and K per head, accumulated in float64
    (the two large sums nearly cancel)."""
    T = q.shape[2]
    t = torch.arange(T, device=q.device, dtype=torch.float64)
    qdq = (q.float() * dq.float()).sum(-1).double()             # [B,H,T]
    kdk = (k.float() * dk.float()).sum(-1).double()
    da = ((t + (0.0 if strict else 1.0)) * qdq).sum((0, 2)) - ((t + 1.0) * kdk).sum((0, 2))
    if dht is not None and final is not None:
        da = da + T * (dht.double() * final.double()).sum((0, 2, 3))
    return (da / decay.double()).to(decay.dtype)


class HebbianAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, scale, strict, plan):
        B, H, T, K = q.shape
        V = v.shape[3]
        log2g = _log2_decay(decay)
        BT = plan.BT
        tiles = plan.fwd_tiles(K, V)
        seg = _segment_tokens(B, H, K, V, q.element_size(), (BT, plan.BT_bwd))
        o = torch.empty(B, H, T, V, dtype=v.dtype, device=q.device)
        # The fused forward adds the K tiles' shares of O into a zeroed float32 buffer.
        o_acc = o
        if plan.fused and fused_needs_atomics(K, tiles):
            o_acc = torch.zeros(B, H, T, V, dtype=torch.float32, device=q.device)
        training = any(ctx.needs_input_grad)
        state = initial_state
        boundaries = []
        for t0, nts in _segments(T, seg, BT):
            boundaries.append(state)
            # Without grad the carry is updated in place (each program reads its tile before it
            # writes it); never in the caller's initial_state, and never a saved boundary.
            reuse = not training and state is not None and state is not initial_state
            nxt = state if reuse else torch.empty(B, H, K, V, dtype=torch.float32,
                                                  device=q.device)
            if plan.fused:
                chunk_output.chunk_fwd_fused(q, k, v, o_acc, log2g, state, nxt, scale, strict,
                                             t0=t0, nts=nts, tiles=tiles)
            else:
                h = chunk_state.chunk_fwd_h(k, v, log2g, state, t0=t0, nts=nts, tiles=tiles,
                                            ht=nxt)
                chunk_output.chunk_fwd_o(q, k, v, h, o, log2g, scale, strict, t0=t0, nts=nts,
                                  tiles=tiles)
                del h
            state = nxt
        if o_acc is not o:
            o.copy_(o_acc)
            del o_acc
        if not training:
            boundaries = boundaries[:1]
        if T == 0:
            state = (initial_state.clone() if initial_state is not None
                     else torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device))
        # The decay's gradient needs the final state (see `_decay_grad`).
        final = state if (ctx.needs_input_grad[3] and state is not None) else None
        ctx.save_for_backward(q, k, v, log2g, decay, final,
                              *[b for b in boundaries if b is not None])
        ctx.first_is_none = bool(boundaries) and boundaries[0] is None
        ctx.has_h0 = initial_state is not None
        ctx.scale, ctx.strict, ctx.plan, ctx.seg = scale, strict, plan, seg
        return o, state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log2g, decay, final, *saved = ctx.saved_tensors
        boundaries = ([None] if ctx.first_is_none else []) + list(saved)
        B, H, T, K = q.shape
        HV, V = v.shape[1], v.shape[3]
        scale, strict, BT = ctx.scale, ctx.strict, ctx.plan.BT_bwd
        tiles = ctx.plan.bwd_tiles(K, V)
        do = do.contiguous() if do is not None else torch.zeros(B, H, T, V, dtype=v.dtype,
                                                                device=q.device)
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        shared = HV == 1 and H > 1
        dv = torch.empty_like(v)
        # The reverse carry dL/dS, float32; updated in place segment by segment.
        dcarry = (dht.float().contiguous().clone() if dht is not None
                  else torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device))
        segs = _segments(T, ctx.seg, BT)
        for (t0, nts), h0 in zip(reversed(segs), reversed(boundaries)):
            h = chunk_state.chunk_fwd_h(k, v, log2g, h0, t0=t0, nts=nts, tiles=tiles)
            dh = chunk_state.chunk_bwd_dh(q, do, log2g, dcarry, dcarry, scale, strict, t0=t0,
                                    nts=nts, tiles=tiles)
            dA = chunk_grad.chunk_bwd_dA(v, do, log2g, scale, strict, t0=t0, nts=nts, tiles=tiles)
            chunk_grad.chunk_bwd_dqk(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, strict, t0=t0,
                                nts=nts, tiles=tiles)
            del h, dA
            if shared:
                # One v for all heads: per-head dv in float32 for this segment, summed over heads.
                t_len = min(nts * BT, T - t0)
                dv_h = torch.empty(B, H, t_len, V, dtype=torch.float32, device=q.device)
                chunk_grad.chunk_bwd_dv(q, k, do, dh, dv_h, log2g, scale, strict, t0=t0, nts=nts,
                                   t_dv=t0, tiles=tiles)
                dv[:, :, t0:t0 + t_len] = dv_h.sum(1, keepdim=True).to(dv.dtype)
                del dv_h
            else:
                chunk_grad.chunk_bwd_dv(q, k, do, dh, dv, log2g, scale, strict, t0=t0, nts=nts,
                                   t_dv=0, tiles=tiles)
            del dh
        dh0 = dcarry if ctx.has_h0 else None
        ddecay = None
        if ctx.needs_input_grad[3]:
            ddecay = _decay_grad(q, k, dq, dk, decay, final, dht, strict)
        return dq, dk, dv, ddecay, dh0, None, None, None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels run in. float64: float32 (Triton's float64 dots are slow where they
    exist at all). float16: float32, because per-chunk states and the carried state would pass
    float16's 65504 long before the scaled output does (use bf16 for speed). bfloat16 under
    TRITON_INTERPRET: float32, because the interpreter mis-loads bf16."""
    if dtype in (torch.float64, torch.float16):
        return torch.float32
    if dtype == torch.bfloat16 and INTERPRET:
        return torch.float32
    return dtype


def check_grid(B: int, H: int) -> None:
    if B * H > MAX_GRID_BH:
        raise ValueError(f"q: B·H = {B}·{H} = {B * H} exceeds the kernels' grid limit of "
                         f"{MAX_GRID_BH}; split the batch into pieces of at most "
                         f"{MAX_GRID_BH // H} rows")


def hebbian_attention_triton(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                             output_final_state=False, chunk_size=None,
                             launch: ChunkLaunch | None = None):
    """Chunked Hebbian attention on the Triton kernels. Inputs as `kernels.hebbian_attention`
    (already validated there). Returns (o [B,H,T,V] in v's dtype, S [B,H,K,V] float32 or None).

    Inputs run in `_compute_dtype` (v is cast to it too); o keeps v's dtype. ``launch`` sets
    the algorithm, chunks and tiles; by default `plan.default_chunk_launch` for the shape.
    """
    out_dtype = v.dtype
    B, H, _, K = q.shape
    check_grid(B, H)
    cd = _compute_dtype(q.dtype)
    qc = q.to(cd).contiguous()
    kc = qc if k is q else k.to(cd).contiguous()      # keep q is k (BDH): the kernels read it once
    vc = v.to(cd).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    V = v.shape[3]
    launch = launch or default_chunk_launch(B, H, K, V, cd, q.device)
    p = make_plan(B, H, K, V, launch, chunk_size)
    o, S = HebbianAttentionFunction.apply(qc, kc, vc, decay, h0, float(scale), bool(strict), p)
    return o.to(out_dtype), (S if output_final_state else None)

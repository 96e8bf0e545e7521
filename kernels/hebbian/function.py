"""The autograd Function over the chunked Triton kernels (chunk.py), walking the sequence in
segments so that memory stays bounded at any length.

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

from . import chunk

SEGMENT_TOKENS = 16384
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


class HebbianAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, scale, strict, fused, BT, BT_bwd):
        B, H, T, K = q.shape
        V = v.shape[3]
        log2g = _log2_decay(decay)
        tiles = chunk.Tiles(K, V, BT, fused)
        seg = _segment_tokens(B, H, K, V, q.element_size(), (BT, BT_bwd))
        o = torch.empty(B, H, T, V, dtype=v.dtype, device=q.device)
        # The fused forward adds the K tiles' shares of O into a zeroed float32 buffer.
        o_acc = o
        if tiles.fused and chunk.fused_needs_atomics(K, tiles):
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
            if tiles.fused:
                chunk.chunk_fwd_fused(q, k, v, o_acc, log2g, state, nxt, scale, strict, t0=t0,
                                      nts=nts, tiles=tiles)
            else:
                h = chunk.chunk_fwd_h(k, v, log2g, state, t0=t0, nts=nts, tiles=tiles, ht=nxt)
                chunk.chunk_fwd_o(q, k, v, h, o, log2g, scale, strict, t0=t0, nts=nts,
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
        ctx.save_for_backward(q, k, v, log2g, *[b for b in boundaries if b is not None])
        ctx.first_is_none = bool(boundaries) and boundaries[0] is None
        ctx.has_h0 = initial_state is not None
        ctx.scale, ctx.strict, ctx.BT, ctx.seg = scale, strict, BT_bwd, seg
        return o, state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log2g, *saved = ctx.saved_tensors
        boundaries = ([None] if ctx.first_is_none else []) + list(saved)
        B, H, T, K = q.shape
        HV, V = v.shape[1], v.shape[3]
        scale, strict, BT = ctx.scale, ctx.strict, ctx.BT
        tiles = chunk.Tiles(K, V, BT)
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
            h = chunk.chunk_fwd_h(k, v, log2g, h0, t0=t0, nts=nts, tiles=tiles)
            dh = chunk.chunk_bwd_dh(q, do, log2g, dcarry, dcarry, scale, strict, t0=t0,
                                    nts=nts, tiles=tiles)
            dA = chunk.chunk_bwd_dA(v, do, log2g, scale, strict, t0=t0, nts=nts, tiles=tiles)
            chunk.chunk_bwd_dqk(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, strict, t0=t0,
                                nts=nts, tiles=tiles)
            del h, dA
            if shared:
                # One v for all heads: per-head dv in float32 for this segment, summed over heads.
                t_len = min(nts * BT, T - t0)
                dv_h = torch.empty(B, H, t_len, V, dtype=torch.float32, device=q.device)
                chunk.chunk_bwd_dv(q, k, do, dh, dv_h, log2g, scale, strict, t0=t0, nts=nts,
                                   t_dv=t0, tiles=tiles)
                dv[:, :, t0:t0 + t_len] = dv_h.sum(1, keepdim=True).to(dv.dtype)
                del dv_h
            else:
                chunk.chunk_bwd_dv(q, k, do, dh, dv, log2g, scale, strict, t0=t0, nts=nts,
                                   t_dv=0, tiles=tiles)
            del dh
        dh0 = dcarry if ctx.has_h0 else None
        return dq, dk, dv, None, dh0, None, None, None, None, None


def hebbian_attention_triton(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                             output_final_state=False, chunk_size=None):
    """Chunked Hebbian attention on the Triton kernels. Inputs as `kernels.hebbian_attention`
    (already validated there). Returns (o [B,H,T,V] in v's dtype, S [B,H,K,V] float32 or None).

    float64 inputs run in float32 (Triton's float64 dots are slow where they exist at all);
    a v whose dtype differs from q's is cast to q's dtype for the kernels; o keeps v's dtype.
    """
    out_dtype = v.dtype
    cd = torch.float32 if q.dtype == torch.float64 else q.dtype
    qc = q.to(cd).contiguous()
    kc = k.to(cd).contiguous()
    vc = v.to(cd).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    B, H, _, K = q.shape
    fused, BT, BT_bwd = chunk.plan(B, H, K, v.shape[3], chunk_size)
    o, S = HebbianAttentionFunction.apply(qc, kc, vc, decay, h0, float(scale), bool(strict),
                                          fused, BT, BT_bwd)
    return o.to(out_dtype), (S if output_final_state else None)

"""Routing: which slots each query reads, and with what weight.

Slots are [bank slots 0..n-1, then this call's complete chunks n..n+nC-1]. Query i (key index
offset + i, chunk c_i) may read every bank slot and the call's chunks j < c_i. Its score for
slot j is r_i · h_j / sqrt(M); it keeps the top_k valid scores (all of them when top_k is None)
and p = softmax over the kept ones.

Scores are computed per block of queries ([BQ, S] at a time, never [T, S] at once), top-k runs
on the block, and only (idx, selected score) survive: [B,H,T,k]. No host sync. The backward
of the selected scores is blockwise too: scatter dscore into a [BQ, S] block, then
dr = dS_blk @ h and dh += dS_blkᵀ @ r: the same O(T·S·M) as the forward scores.

Non-finite scores: a valid slot scored NaN or +inf is a candidate like any other (torch.topk
ranks NaN above every number), and it makes the query's weights p NaN, as the reference does;
a -inf score is no candidate.
"""
from __future__ import annotations

import math

import torch

from .launch import RoutingLaunch

# Elements of one [B,H,BQ,S] score block; bounds the routing's working memory.
SCORE_BLOCK_ELEMS = 1 << 24


def _query_block(B, H, S, Tq):
    return max(1, min(Tq, SCORE_BLOCK_ELEMS // max(1, B * H * S)))


def _valid(i0, i1, S, n, offset, chunk_size, device, chunk_lo=None):
    """[BQ, S] mask: bank slots always, call chunks strictly before the query's chunk (and, for
    packed sequences, from the first chunk of its own sequence: chunk_lo[c])."""
    c_q = (torch.arange(i0, i1, device=device) + offset) // chunk_size
    j = torch.arange(S, device=device)
    valid = (j[None, :] < n) | ((j[None, :] - n) < c_q[:, None])
    if chunk_lo is not None:
        valid &= j[None, :] >= chunk_lo[c_q].long()[:, None]
    return valid


class _SelectedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, h, n, offset, chunk_size, kk, chunk_lo=None):
        B, H, Tq, M = r.shape
        S = h.shape[2]
        cd = h.dtype
        inv = 1.0 / math.sqrt(M)
        idx = torch.empty(B, H, Tq, kk, dtype=torch.int64, device=r.device)
        sel = torch.empty(B, H, Tq, kk, dtype=cd, device=r.device)
        BQ = _query_block(B, H, S, Tq)
        for i0 in range(0, Tq, BQ):
            i1 = min(Tq, i0 + BQ)
            s = (r[:, :, i0:i1].to(cd) @ h.transpose(-1, -2)) * inv          # [B,H,bq,S]
            s = s.masked_fill(~_valid(i0, i1, S, n, offset, chunk_size, r.device, chunk_lo),
                              float("-inf"))
            vals, inds = s.topk(kk, dim=-1)
            # -inf: no valid slot left; NaN and +inf stay (they poison the row's weights).
            idx[:, :, i0:i1] = torch.where(vals != float("-inf"), inds, -1)
            sel[:, :, i0:i1] = vals
        ctx.save_for_backward(r, h, idx)
        ctx.mark_non_differentiable(idx)
        return idx, sel

    @staticmethod
    def backward(ctx, _didx, dsel):
        r, h, idx = ctx.saved_tensors
        B, H, Tq, M = r.shape
        S = h.shape[2]
        inv = 1.0 / math.sqrt(M)
        dr = torch.empty(B, H, Tq, M, dtype=h.dtype, device=r.device)
        dh = torch.zeros_like(h)
        BQ = _query_block(B, H, S, Tq)
        for i0 in range(0, Tq, BQ):
            i1 = min(Tq, i0 + BQ)
            blk_idx = idx[:, :, i0:i1]
            g = torch.where(blk_idx >= 0, dsel[:, :, i0:i1].to(h.dtype), 0.0) * inv
            dS = torch.zeros(B, H, i1 - i0, S + 1, dtype=h.dtype, device=r.device)
            dS.scatter_add_(-1, torch.where(blk_idx >= 0, blk_idx, S), g)
            dS = dS[..., :S]
            dr[:, :, i0:i1] = dS @ h
            dh += dS.transpose(-1, -2) @ r[:, :, i0:i1].to(h.dtype)
        return dr.to(r.dtype), dh, None, None, None, None, None


def route(r, h, *, n, offset, chunk_size, top_k, backend="torch", inverse=None,
          launch: RoutingLaunch = RoutingLaunch(), chunk_lo=None, most_candidates=None,
          bthk=False):
    """r [B,H,Tq,M], h [B,H,S,M] (bank slots first, then the call's chunks; state dtype).
    Returns idx [B,H,Tq,k] int64 (-1 = no slot) and p [B,H,Tq,k] (h's dtype, 0 where idx = -1),
    with k = min(top_k, S, most_candidates) (S when top_k is None); the Triton kernel keeps
    k = top_k (a constexpr: see routing_triton). p is differentiable in r and h.
    backend "triton" with launch.method "triton" selects with `routing_triton` (float32 h,
    top_k <= its MAX_TOP_K, M <= 256; else the blockwise PyTorch form below) at ``launch``'s
    tiles. inverse: a `readout_triton.SharedInverseIndex` the Triton backward takes its sort of
    idx from (the readout of the same picks fills it).
    Packed sequences (kernels.bsbr.varlen, no bank): chunk_lo [chunks] int32, the first chunk
    of the sequence holding each query chunk (query i reads chunks chunk_lo[c_i] <= j < c_i);
    most_candidates, the most slots any query may read. bthk: r stored token-major."""
    S = h.shape[2]
    kk = S if top_k is None else min(top_k, S)
    if most_candidates is not None:
        kk = min(kk, most_candidates)
    if chunk_lo is not None and n:
        raise ValueError(f"chunk_lo: packed sequences take no bank, got {n} bank slots")
    idx = None
    if backend == "triton" and launch.method == "triton" and h.dtype == torch.float32:
        from .routing_triton import MAX_TOP_K, SelectedScoresTriton
        if top_k is not None and top_k <= MAX_TOP_K and h.shape[-1] <= 256:   # M: one tile
            idx, sel = SelectedScoresTriton.apply(r, h, n, offset, chunk_size, top_k, inverse,
                                                  launch, chunk_lo, bthk)
    if idx is None:
        idx, sel = _SelectedScores.apply(r, h, n, offset, chunk_size, kk, chunk_lo)
    # Softmax over the kept scores; rows with no candidate at all (every entry -inf) give 0.
    # A NaN or +inf kept score makes m non-finite, so the row's p is NaN (the contract).
    m = sel.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(idx >= 0, torch.exp(sel - m), torch.zeros_like(sel))
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return idx, p


def bank_slot_weights(idx, p, n):
    """Σ over queries of the weight each bank slot (index < n) received: [B,H,n], no grad."""
    B, H = idx.shape[:2]
    w = torch.zeros(B, H, n + 1, dtype=p.dtype, device=p.device)
    tgt = torch.where((idx >= 0) & (idx < n), idx, n).flatten(2)
    w.scatter_add_(-1, tgt, p.detach().flatten(2))
    return w[..., :n]

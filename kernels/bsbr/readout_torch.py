"""Routed readout in blockwise PyTorch: long_t = Σ_k p_tk (q_t F_{idx_tk}).

Per block of queries the selected states are gathered ([BQ·k, K, V], bounded by
GATHER_BLOCK_ELEMS) so the cost is the sparse one, O(T·k·K·V), and nothing of size T×S is
built. A custom autograd Function keeps the memory flat: the backward re-gathers instead of
saving the gathered states. dF is an index_add_ (atomic, so not bit-deterministic on CUDA).
"""
from __future__ import annotations

import torch

GATHER_BLOCK_ELEMS = 1 << 24


def _blocks(B, H, Tq, kk, K, V):
    BQ = max(1, min(Tq, GATHER_BLOCK_ELEMS // max(1, B * H * kk * K * V)))
    return [(i0, min(Tq, i0 + BQ)) for i0 in range(0, Tq, BQ)]


def _flat_index(idx, S):
    """Rows of F viewed as [B·H·S, K, V] for idx [B,H,bq,k] (-1 → row 0; its p is 0)."""
    B, H = idx.shape[:2]
    base = torch.arange(B * H, device=idx.device).view(B, H, 1, 1) * S
    return (base + idx.clamp(min=0)).flatten()


class RoutedReadoutTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, F, idx, p):
        B, H, Tq, K = q.shape
        S, V = F.shape[2], F.shape[4]
        kk = idx.shape[3]
        Ff = F.reshape(B * H * S, K, V)
        out = torch.empty(B, H, Tq, V, dtype=F.dtype, device=q.device)
        for i0, i1 in _blocks(B, H, Tq, kk, K, V):
            Fg = Ff.index_select(0, _flat_index(idx[:, :, i0:i1], S)).view(B, H, i1 - i0, kk, K, V)
            w = torch.where(idx[:, :, i0:i1] >= 0, p[:, :, i0:i1], 0.0).to(F.dtype)
            out[:, :, i0:i1] = torch.einsum("bhtj,bhtk,bhtjkv->bhtv", w,
                                            q[:, :, i0:i1].to(F.dtype), Fg)
        ctx.save_for_backward(q, F, idx, p)
        return out

    @staticmethod
    def backward(ctx, do):
        q, F, idx, p = ctx.saved_tensors
        B, H, Tq, K = q.shape
        S, V = F.shape[2], F.shape[4]
        kk = idx.shape[3]
        Ff = F.reshape(B * H * S, K, V)
        dq = torch.empty(B, H, Tq, K, dtype=F.dtype, device=q.device)
        dp = torch.empty(B, H, Tq, kk, dtype=F.dtype, device=q.device)
        dF = torch.zeros_like(Ff)
        do = do.to(F.dtype)
        for i0, i1 in _blocks(B, H, Tq, kk, K, V):
            rows = _flat_index(idx[:, :, i0:i1], S)
            Fg = Ff.index_select(0, rows).view(B, H, i1 - i0, kk, K, V)
            m = idx[:, :, i0:i1] >= 0
            w = torch.where(m, p[:, :, i0:i1], 0.0).to(F.dtype)
            qb, dob = q[:, :, i0:i1].to(F.dtype), do[:, :, i0:i1]
            dq[:, :, i0:i1] = torch.einsum("bhtj,bhtv,bhtjkv->bhtk", w, dob, Fg)
            qF = torch.einsum("bhtk,bhtjkv->bhtjv", qb, Fg)
            dp[:, :, i0:i1] = torch.where(m, torch.einsum("bhtjv,bhtv->bhtj", qF, dob), 0.0)
            contrib = torch.einsum("bhtj,bhtk,bhtv->bhtjkv", w, qb, dob)
            dF.index_add_(0, rows, contrib.reshape(-1, K, V))
        return dq.to(q.dtype), dF.view_as(F), None, dp.to(p.dtype)


def routed_readout_torch(q, F, idx, p):
    """q [B,H,Tq,K], F [B,H,S,K,V] (state dtype), idx [B,H,Tq,k] int (-1 = none), p [B,H,Tq,k].
    Returns long [B,H,Tq,V] in F's dtype; differentiable in q, F and p."""
    return RoutedReadoutTorch.apply(q, F, idx, p)

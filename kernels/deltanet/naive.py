"""The delta rule, the readable reference (DeltaNet).

Per batch element and head the state is S ∈ R^{K×V}. With keys L2-normalised by the caller
and a write strength β_t ∈ (0, 1):

    S_t = S_{t-1} + β_t k_tᵀ (v_t − k_t S_{t-1})        (S_{-1} = initial_state, or zeros)
    o_t = scale · q_t S_t                                (inclusive: t sees itself)

k_t S_{t-1} is what the memory currently returns for k_t; the update moves it a fraction β_t of
the way to v_t (a rank-one "error-correcting" write), instead of only adding k_tᵀ v_t.

Shapes: q, k [B,H,T,K]; v [B,H,T,V]; beta [B,H,T]; initial_state [B,H,K,V].
Computes in float64 for float64 inputs and in float32 otherwise; returns o in v's dtype and S in
the compute dtype. Differentiable by plain autograd; the oracle of `chunk.py`.
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def delta_rule_recurrent(q, k, v, beta, *, scale=1.0, initial_state=None):
    """The recurrence, one token at a time. Returns (o [B,H,T,V], S_final [B,H,K,V])."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    cd, out_dtype = compute_dtype(q), v.dtype
    q, k, v, beta = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    S = (torch.zeros(B, H, K, V, dtype=cd, device=q.device) if initial_state is None
         else initial_state.to(cd))
    outs = []
    for t in range(T):
        k_t, v_t = k[:, :, t], v[:, :, t]                                   # [B,H,K], [B,H,V]
        err = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S)                   # v_t − k_t S
        S = S + beta[:, :, t, None, None] * k_t[..., :, None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    o = torch.stack(outs, dim=2) if T else q.new_zeros(B, H, 0, V)
    return (scale * o).to(out_dtype), S


def delta_rule_step_naive(q, k, v, beta, state, *, scale=1.0):
    """One token: q, k [B,H,K], v [B,H,V], beta [B,H], state [B,H,K,V]. Returns (o [B,H,V] in
    v's dtype, new state); the given state is not modified."""
    S = state
    qs, ks, vs, bs = (t.to(S.dtype) for t in (q, k, v, beta))
    err = vs - torch.einsum("bhk,bhkv->bhv", ks, S)
    S = S + bs[..., None, None] * ks[..., :, None] * err[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", qs, S)
    return (scale * o).to(v.dtype), S

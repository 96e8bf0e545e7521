"""Hebbian attention as one masked product on cuBLAS, for short sequences (training at T ≲ 1k).

    o = scale · ((Q Kᵀ ⊙ D) V + (Γ ⊙ Q) S_{-1})        S_T = Kᵀ(W ⊙ V) + γ^T S_{-1}

D is the strict (s < t) or inclusive (s ≤ t) causal mask, times γ^{t-1-s} / γ^{t-s} when decay
is on; Γ holds γ^t (strict) or γ^{t+1} (inclusive), W the weights γ^{T-1-s}. This is
`naive.hebbian_quadratic` in the input dtype: the matmuls run on tensor cores with float32
accumulation, and the final state is formed in float32. Its cost is O(T²·(K+V)) per head and it
holds a [B,H,T,T] score matrix, so it only pays while T is small next to K (BDH: K = 8192);
the chunked Triton kernels take over beyond that. Differentiable by autograd.
"""
from __future__ import annotations

import torch


def dense_hebbian(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                  output_final_state=False):
    """Returns (o [B,H,T,V] in v's dtype, S_final [B,H,K,V] float32 or None)."""
    B, H, T, K = q.shape
    dt = q.dtype
    vv = v.to(dt)
    t = torch.arange(T, device=q.device)
    mask = (t[:, None] > t[None, :]) if strict else (t[:, None] >= t[None, :])
    scores = q @ k.transpose(-1, -2)                                   # [B,H,T,T]
    log_g = None if decay is None else decay.float().log().view(H, 1, 1)
    if log_g is None:
        scores = scores.masked_fill(~mask, 0)
    else:
        expo = (t[:, None] - t[None, :] - (1 if strict else 0)).clamp(min=0).float()
        D = torch.where(mask, torch.exp(log_g * expo), torch.zeros((), device=q.device))
        scores = scores * D.to(dt)
    o = scores @ vv                                                    # v broadcasts over H
    if initial_state is not None:
        S0 = initial_state.to(dt)
        qw = q if log_g is None else q * torch.exp(
            log_g[:, :, 0] * (t + (0 if strict else 1)).float()).to(dt)[None, :, :, None]
        o = o + qw @ S0
    S = None
    if output_final_state:
        vw = vv.float() if log_g is None else vv.float() * torch.exp(
            log_g[:, :, 0] * (T - 1 - t).float())[None, :, :, None]
        S = k.float().transpose(-1, -2) @ vw
        if initial_state is not None:
            S = S + (initial_state if log_g is None
                     else initial_state * torch.exp(log_g[:, 0, 0] * T).view(1, H, 1, 1))
    return (o * scale).to(v.dtype), S

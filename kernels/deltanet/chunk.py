"""The delta rule in chunks (the WY / UT-transform form), in plain PyTorch.

Inside a chunk of L tokens that starts from state S, write u_t = β_t (v_t − k_t S_{t-1}) for
the value actually added at t, so that S_t = S + Σ_{s≤t} k_sᵀ u_s. Substituting S_{t-1}:

    u_t = β_t (v_t − k_t S) − β_t Σ_{s<t} (k_t·k_s) u_s
    ⇔   A U = diag(β) (V − K S),     A = I + strictly_lower(diag(β) K Kᵀ)   (unit lower-triangular)

so with the UT transform T = A⁻¹ (one triangular solve per chunk, all chunks at once):

    W = T diag(β) K,   U₀ = T diag(β) V,   U = U₀ − W S
    O = scale · (Q S + lower(Q Kᵀ) U)        (lower: s ≤ t, inclusive)
    S ← S + Kᵀ U

Only the last three lines depend on S, so they are the sequential loop over chunks; W and U₀
are computed for every chunk in parallel. T is padded to a multiple of the chunk with k = v = 0,
β = 0: a padded token writes nothing and is dropped from the output.
Differentiable by autograd. Accumulates in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import compute_dtype


def chunk_delta_rule_torch(q, k, v, beta, *, scale=1.0, initial_state=None, chunk_size=64):
    """q, k [B,H,T,K]; v [B,H,T,V]; beta [B,H,T]; initial_state None or [B,H,K,V].
    Returns (o [B,H,T,V] in v's dtype, S_final [B,H,K,V] float32 / float64)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    cd = compute_dtype(q)
    L = chunk_size
    pad = (-T) % L
    q, k, v, beta = (F.pad(t.to(cd), (0, 0, 0, pad)) if t.dim() == 4
                     else F.pad(t.to(cd), (0, pad)) for t in (q, k, v, beta))
    n = (T + pad) // L
    qc, kc, vc = (t.reshape(B, H, n, L, t.shape[-1]) for t in (q, k, v))
    bc = beta.reshape(B, H, n, L, 1)

    # UT transform for every chunk at once: A = I + strictly_lower(diag(β) K Kᵀ).
    eye = torch.eye(L, dtype=cd, device=q.device)
    strict_lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    A = eye + (bc * (kc @ kc.transpose(-1, -2))).masked_fill(~strict_lower, 0)
    W = torch.linalg.solve_triangular(A, bc * kc, upper=False, unitriangular=True)
    U0 = torch.linalg.solve_triangular(A, bc * vc, upper=False, unitriangular=True)
    lower = ~torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    QK = (qc @ kc.transpose(-1, -2)).masked_fill(~lower, 0)               # [B,H,n,L,L]

    S = (torch.zeros(B, H, K, V, dtype=cd, device=q.device) if initial_state is None
         else initial_state.to(cd))
    out = []
    for c in range(n):
        U = U0[:, :, c] - W[:, :, c] @ S
        out.append(qc[:, :, c] @ S + QK[:, :, c] @ U)
        S = S + kc[:, :, c].transpose(-1, -2) @ U
    o = torch.cat(out, dim=2)[:, :, :T] if n else q.new_zeros(B, H, 0, V)
    return (scale * o).to(v.dtype), S

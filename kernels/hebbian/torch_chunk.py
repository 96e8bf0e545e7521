"""Chunked Hebbian attention in plain PyTorch (the CPU path, and the cuBLAS peer in benchmarks).

Chunk c with local positions i, j ∈ [0, L) and S the state before the chunk:

    strict:     o_i = scale · (γ^i q_i S + Σ_{j<i} γ^{i-1-j} (q_i·k_j) v_j)
    inclusive:  o_i = scale · (γ^{i+1} q_i S + Σ_{j≤i} γ^{i-j} (q_i·k_j) v_j)
    next state: S ← γ^L S + Σ_j γ^{L-1-j} k_jᵀ v_j

Differentiable by autograd. The state is accumulated in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch


def _decay_weights(log_g, L: int, strict: bool, device, dtype):
    """Per-head intra-chunk weights D [H,L,L], inter weights w_in [H,L] on q, and state weights
    w_k [H,L] on k, with w_end = γ^L. ``log_g`` is None (no decay) or log γ of shape [H]."""
    i = torch.arange(L, device=device)
    mask = (i[:, None] > i[None, :]) if strict else (i[:, None] >= i[None, :])
    if log_g is None:
        return mask.to(dtype), None, None, None
    lg = log_g.to(dtype).view(-1, 1, 1)
    expo = (i[:, None] - i[None, :] - (1 if strict else 0)).clamp(min=0).to(dtype)
    D = torch.where(mask, torch.exp(lg * expo), torch.zeros((), dtype=dtype, device=device))
    w_in = torch.exp(lg[:, :, 0] * (i + (0 if strict else 1)).to(dtype))          # [H,L]
    w_k = torch.exp(lg[:, :, 0] * (L - 1 - i).to(dtype))                          # [H,L]
    w_end = torch.exp(lg[:, 0, 0] * L)                                            # [H]
    return D, w_in, w_k, w_end


def chunk_hebbian_torch(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                        chunk_size=64):
    """Returns (o [B,H,T,V] in v's dtype, S_final [B,H,K,V] float32/float64)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Matmuls run in the input dtype on CUDA (tensor cores); the CPU has no fast half matmuls.
    cd = q.dtype if (q.is_cuda or q.dtype == torch.float64) else sd
    S = (torch.zeros(B, H, K, V, dtype=sd, device=q.device) if initial_state is None
         else initial_state.to(sd))
    log_g = None if decay is None else decay.to(sd).log()
    out = []
    for start in range(0, T, chunk_size):
        L = min(chunk_size, T - start)
        qc = q[:, :, start:start + L].to(cd)
        kc = k[:, :, start:start + L].to(cd)
        vc = v[:, :, start:start + L].to(cd)                       # [B,H|1,L,V]
        D, w_in, w_k, w_end = _decay_weights(log_g, L, strict, q.device, sd)
        A = (qc @ kc.transpose(-1, -2)).to(sd) * D                 # [B,H,L,L]
        intra = A.to(cd) @ vc
        q_in = qc if w_in is None else (qc * w_in[None, :, :, None].to(cd))
        o = intra.to(sd) + (q_in @ S.to(cd)).to(sd)
        out.append((scale * o).to(v.dtype))
        k_w = kc if w_k is None else (kc * w_k[None, :, :, None].to(cd))
        kv = (k_w.transpose(-1, -2) @ vc).to(sd)                   # [B,H,K,V]
        S = (S if w_end is None else S * w_end.view(1, H, 1, 1)) + kv
    o = torch.cat(out, dim=2) if out else q.new_zeros(B, H, 0, V, dtype=v.dtype)
    return o, S


def step_hebbian_torch(q, k, v, state, *, scale=1.0, strict=True, decay=None):
    """One token: q, k [B,H,K], v [B,H|1,V], state [B,H,K,V] float32, updated in place.
    Returns (o [B,H,V] in v's dtype, state)."""
    H = q.shape[1]
    qs, ks, vs = q.to(state.dtype), k.to(state.dtype), v.to(state.dtype)
    if strict:
        o = torch.einsum("bhk,bhkv->bhv", qs, state)
    if decay is not None:
        state.mul_(decay.to(state.dtype).view(1, H, 1, 1))
    state.add_(ks[..., :, None] * vs[..., None, :])
    if not strict:
        o = torch.einsum("bhk,bhkv->bhv", qs, state)
    return (scale * o).to(v.dtype), state

"""Per-chunk states of the complete chunks: F_j = K_jᵀ V_j (float32) and h_j = mean of hk over
the chunk. One batched matmul over chunks, O(T·K·V); differentiable by autograd (dF flows back
to k and v through this matmul)."""
from __future__ import annotations

from .naive import state_dtype


def chunk_states_torch(k, v, hk, *, chunk_size):
    B, H, T, K = k.shape
    V, M = v.shape[3], hk.shape[3]
    C = chunk_size
    nC = T // C
    sd = state_dtype(k)
    kc = k[:, :, :nC * C].to(sd).reshape(B, H, nC, C, K)
    vc = v[:, :, :nC * C].to(sd).reshape(B, H, nC, C, V)
    F = kc.transpose(-1, -2) @ vc                                   # [B,H,nC,K,V]
    h = hk[:, :, :nC * C].to(sd).reshape(B, H, nC, C, M).mean(3)    # [B,H,nC,M]
    return F, h

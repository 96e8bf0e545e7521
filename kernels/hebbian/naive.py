"""Hebbian attention, the readable references.

Per batch element and head the state is S ∈ R^{K×V}, with an optional per-head decay γ:

    strict (BDH):  o_t = scale · q_t S_{t-1}        S_t = γ S_{t-1} + k_tᵀ v_t
    inclusive:     o_t = scale · q_t S_t

S_{-1} is ``initial_state`` (or zeros). These functions are the oracles the fast kernels are
tested against: short, obviously correct, and differentiable by plain autograd. They compute in
the dtype they are given (tests pass float64) and return o in that dtype and S in float32 unless
the inputs are float64.

Shapes: q, k [B,H,T,K]; v [B,H,T,V] or [B,1,T,V]; decay None or [H]; state [B,H,K,V].
"""
from __future__ import annotations

import torch


def _state_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def hebbian_recurrent(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None):
    """The recurrence, one token at a time. Returns (o [B,H,T,V], S_final [B,H,K,V])."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    sd = _state_dtype(q)
    S = (torch.zeros(B, H, K, V, dtype=sd, device=q.device) if initial_state is None
         else initial_state.to(sd))
    g = None if decay is None else decay.to(sd).view(1, H, 1, 1)
    outs = []
    for t in range(T):
        kv = k[:, :, t, :, None].to(sd) * v[:, :, t, None, :].to(sd)     # k_tᵀ v_t   [B,H,K,V]
        if strict:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].to(sd), S))
        S = (S if g is None else g * S) + kv
        if not strict:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].to(sd), S))
    o = torch.stack(outs, dim=2) if T > 0 else q.new_zeros(B, H, 0, V, dtype=sd)
    return (scale * o).to(v.dtype), S


def hebbian_quadratic(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None):
    """The same function as one masked product: o = scale · ((Q Kᵀ ⊙ D) V + Γ Q S_{-1}), where D
    holds γ^{t-1-s} for s < t (strict) or γ^{t-s} for s ≤ t (inclusive), and Γ the matching
    γ^t (strict) or γ^{t+1} (inclusive) on the initial state. Returns (o, S_final)."""
    B, H, T, K = q.shape
    sd = _state_dtype(q)
    qd, kd, vd = q.to(sd), k.to(sd), v.to(sd)
    t = torch.arange(T, device=q.device)
    diff = (t[:, None] - t[None, :]).to(sd)                         # t - s
    mask = (t[:, None] > t[None, :]) if strict else (t[:, None] >= t[None, :])
    if decay is None:
        log_g = torch.zeros(H, dtype=sd, device=q.device)
    else:
        log_g = decay.to(sd).log()
    shift = 1.0 if strict else 0.0
    # Decay weights; masked entries are set to 0 (never exp of a positive exponent).
    expo = (diff - shift).clamp(min=0)
    D = torch.where(mask, torch.exp(log_g.view(H, 1, 1) * expo), torch.zeros((), dtype=sd,
                                                                              device=q.device))
    A = torch.einsum("bhtk,bhsk->bhts", qd, kd) * D                  # [B,H,T,T]
    o = torch.einsum("bhts,bhsv->bhtv", A, vd.expand(B, H, T, vd.shape[-1]))
    # Final state: Σ_s γ^{T-1-s} k_sᵀ v_s (+ γ^T S_{-1}).
    w_final = torch.exp(log_g.view(1, H, 1) * (T - 1 - t).to(sd))     # [1,H,T]
    S = torch.einsum("bhtk,bhtv->bhkv", kd * w_final[..., None], vd.expand(B, H, T, vd.shape[-1]))
    if initial_state is not None:
        S0 = initial_state.to(sd)
        pow_t = t.to(sd) + (0.0 if strict else 1.0)                  # γ^t strict, γ^{t+1} incl.
        w0 = torch.exp(log_g.view(1, H, 1) * pow_t)                   # [1,H,T]
        o = o + torch.einsum("bhtk,bhkv->bhtv", qd * w0[..., None], S0)
        S = S + torch.exp(log_g * T).view(1, H, 1, 1) * S0
    return (scale * o).to(v.dtype), S

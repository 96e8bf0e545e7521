"""Plain PyTorch references for the sparse decoding step (`sparse_step.py`), obviously correct.

BDH's neurons are ReLU-sparse, so one decoding step needs only a few rows of every big operand:

    o = scale · q S              reads only the rows r of S with q_r ≠ 0
    S ← S + kᵀ v                 touches only the rows r with k_r ≠ 0
    y = x @ W                    reads only the rows j of W with x_j ≠ 0   (BDH: xy @ decoder)

These loops pick the rows with `torch.nonzero` (a host sync; fine for a reference) and do the
same math on them alone. The active set of the step is the union of q's and k's non-zeros (the
strict readout of a row with q_r = 0 adds nothing; the update of a row with k_r = 0 adds 0·v).
"""
from __future__ import annotations

import torch


def active_rows_naive(x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
    """For x [R, L] (and optionally y of the same shape): per row r, the ascending int64 indices
    of the entries where x (or y) is non-zero."""
    m = x != 0 if y is None else (x != 0) | (y != 0)
    return [torch.nonzero(m[r]).flatten() for r in range(m.shape[0])]


def sparse_hebbian_step_naive(q, k, v, state, *, scale=1.0, strict=True):
    """One decoding step on the active rows only. q, k [B,H,K]; v [B,H,V] or [B,1,V];
    state [B,H,K,V] float32, updated in place (rows outside the active set are never
    touched). Returns (o [B,H,V] in v's dtype, state)."""
    B, H, K = q.shape
    V = v.shape[-1]
    o = torch.zeros(B, H, V, dtype=state.dtype, device=state.device)
    for b in range(B):
        for h in range(H):
            vs = v[b, h % v.shape[1]].to(state.dtype)
            rows = active_rows_naive(q[b, h][None], k[b, h][None])[0]
            qs = q[b, h, rows].to(state.dtype)
            ks = k[b, h, rows].to(state.dtype)
            S_rows = state[b, h, rows]                                  # a copy [n, V]
            if strict:
                o[b, h] = qs @ S_rows
            S_rows = S_rows + ks[:, None] * vs[None, :]
            state[b, h, rows] = S_rows
            if not strict:
                o[b, h] = qs @ S_rows
    return (scale * o).to(v.dtype), state


def sparse_rows_matmul_naive(x, weight):
    """y[r] = Σ_{j: x[r,j] ≠ 0} x[r,j] · weight[j]   for x [R, L], weight [L, D]; the rows of
    weight for zero entries of x are never read. Accumulates in float32 (float64 stays float64);
    returns y [R, D] in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.zeros(x.shape[0], weight.shape[1], dtype=acc, device=x.device)
    for r, rows in enumerate(active_rows_naive(x)):
        y[r] = x[r, rows].to(acc) @ weight[rows].to(acc)
    return y.to(x.dtype)

"""Context parallelism for Hebbian attention: one sequence split along time over the ranks of a
process group, with only the fixed-size state [B,H,K,V] passed between them.

Rank r holds the L_r tokens [start_r, start_r + L_r) (any lengths, 0 included; rank order is
time order). With S_t = γ S_{t-1} + k_tᵀ v_t, the state after a rank's last token is
γ^{L_r} S_in_r + S_r, where S_r is what the rank's own tokens leave from a zero state. So

    S_in_r = Σ_{s<r} γ^{start_r - end_s} S_s          (end_s = start_s + L_s; the initial
                                                      state rides in S_0, rank 0's own)
    o_t    = o_t(zero start) + scale · γ^{i + [inclusive]} q_t S_in_r     (i = t - start_r)

Each rank runs `hebbian_attention` on its tokens from a zero state (rank 0 from the sequence's
initial state), the S_s are all-gathered (one [world,B,H,K,V] collective: small next to the
tokens) and each rank adds its correction. In the backward the gradient of S_s comes back
from every later rank by a reduce-scatter; `hebbian_attention`'s own backward then turns it
into gradients of q, k, v (and decay, initial_state) on rank s.
"""
from __future__ import annotations

import torch

from ..hebbian import hebbian_attention
from ..hebbian.validate import check_attention_inputs
from .collectives import agree_on_inputs, gather_ranks, join, rank_and_world, require_equal


def entering_weights(lengths: list[int], rank: int, decay, H: int, device) -> torch.Tensor:
    """w [world, H]: S_in of ``rank`` = Σ_s w[s] S_s, i.e. γ^{tokens between the end of s and
    the start of rank} for s < rank, 0 from rank on (1 for s < rank without decay)."""
    world = len(lengths)
    before = torch.tensor([s < rank for s in range(world)], device=device)
    if decay is None:
        return before[:, None].float().expand(world, H)
    # Tokens from the end of rank s to the start of ``rank``: those of ranks s+1 .. rank-1.
    gap = [sum(lengths[s + 1:rank]) if s < rank else 0 for s in range(world)]
    gap = torch.tensor(gap, dtype=torch.float32, device=device)
    w = decay.float()[None, :] ** gap[:, None]
    return torch.where(before[:, None], w, torch.zeros_like(w))


def entering_correction(q, S_in, *, scale, strict, decay) -> torch.Tensor:
    """scale · γ^{i + [not strict]} q_i S_in for every local position i: [B,H,T,V], float32 (or
    q's dtype when q is 16-bit: the product runs on the tensor cores, accumulating in float32)."""
    T = q.shape[2]
    cd = q.dtype if q.element_size() == 2 else torch.float32
    corr = torch.matmul(q.to(cd), S_in.to(cd)).float()
    if decay is None:
        return corr * scale
    power = torch.arange(T, dtype=torch.float32, device=q.device) + (0.0 if strict else 1.0)
    coef = scale * decay.float()[:, None] ** power[None, :]                  # [H, T]
    return corr * coef[None, :, :, None]


def hebbian_attention_cp(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                         output_final_state=False, chunk_size=None, backend="auto", launch=None,
                         group=None):
    """`kernels.hebbian_attention` over a sequence split along time across the ranks of
    ``group`` (default: the whole world), the ranks holding consecutive pieces in rank order.

    Every rank passes its own q, k [B,H,L_r,K] and v [B,H|1,L_r,V] (L_r may differ, even be
    0); B, H, K, V, strict and whether decay is given must agree, and decay [H] must be the same
    tensor value on every rank. initial_state, the state before the first token, is passed by
    rank 0 only (None elsewhere). Returns (o [B,H,L_r,V]: this rank's outputs, exactly those
    of one call on the whole sequence, and, with output_final_state, the state after this
    rank's last token, the sequence's final state on the last rank).

    Gradients: of q, k, v (and initial_state on rank 0) as one call would give; decay is
    replicated, so each rank gets the part of its gradient that its own tokens make (sum it
    over the group, as data parallelism sums parameter gradients). Every rank must run the
    backward: the state gradients travel in a collective. A bad input on any rank raises on
    every rank (the inputs are agreed on before any work)."""
    rank, world = rank_and_world(group)
    error, sizes = None, [-1] * 5
    try:
        sizes = list(check_attention_inputs(q, k, v, decay, initial_state, chunk_size, scale))
        if initial_state is not None and rank != 0:
            raise ValueError(f"initial_state: the state before the sequence is passed by rank 0 "
                             f"only (it holds the first tokens), got a tensor on rank {rank}")
    except (ValueError, TypeError) as e:
        error = e
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, decay, initial_state))
    B, H, T, K, V = sizes
    table = agree_on_inputs([T, B, H, K, V, decay is not None, bool(strict), needs_grad], error,
                            group)
    require_equal(table, ("B", "H", "K", "V", "decay (given or None)", "strict",
                          "grad mode (whether an input needs a gradient)"), first=1)
    o, S_own = hebbian_attention(q, k, v, scale=scale, strict=strict, decay=decay,
                                 initial_state=initial_state, output_final_state=True,
                                 chunk_size=chunk_size, backend=backend, launch=launch)
    if world == 1:
        return o, (S_own if output_final_state else None)
    lengths = table[:, 0].tolist()
    S_all = gather_ranks(S_own, group, needs_grad)                      # [world,B,H,K,V]
    w = entering_weights(lengths, rank, decay, H, S_own.device)
    S_in = torch.einsum("sh,sbhkv->bhkv", w, S_all)
    if rank > 0 and T > 0:
        o = (o + entering_correction(q, S_in, scale=scale, strict=strict, decay=decay)
             ).to(o.dtype)
    else:
        o = join(o, S_in)              # reads no earlier state, yet joins the backward's collective
    if not output_final_state:
        return o, None
    carry = S_in if decay is None else S_in * decay.float()[None, :, None, None] ** T
    return o, carry + S_own

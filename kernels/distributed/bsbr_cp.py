"""Context parallelism for BSBR attention: one sequence split along time over the ranks of a
process group, each rank reading the earlier ranks' completed chunks as its bank.

A query of rank r reads local softmax attention inside its own chunk, and routes over every
completed chunk before its own: those of rank r, and all chunks of the ranks before r. Every
cut must therefore fall on a chunk boundary (every rank but the last holds a whole number of
chunks; `split_lengths(T, world, multiple=chunk_size)` makes such a split), so no chunk spans
two ranks and the local attention never needs another rank's keys. Then

    bank of rank r = (F_j, h_j) of the chunks of ranks 0 .. r-1, in order
    o (rank r)     = bsbr_attention(own tokens, bank_F, bank_h)

which is exactly one call on the whole sequence. The chunk states of all ranks but the last
(F [K,V] and h [M] per chunk: small next to the tokens) are all-gathered in one collective;
in the backward their gradients return by a reduce-scatter to the rank that made them, whose
`chunk_states` backward turns them into gradients of k, v and hk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bsbr import bsbr_attention, chunk_states
from ..bsbr.validate import check_bsbr_inputs, check_long_scale
from .collectives import agree_on_inputs, gather_ranks, join, rank_and_world, require_equal


def check_cuts(lengths: list[int], chunk_size: int) -> None:
    """ValueError unless every rank but the last holds a whole number of chunks."""
    for s, L in enumerate(lengths[:-1]):
        if L % chunk_size:
            raise ValueError(
                f"q: rank {s} holds {L} tokens, not a multiple of chunk_size={chunk_size}: "
                f"every rank but the last must end at a chunk boundary (got lengths {lengths}; "
                f"kernels.distributed.split_lengths(T, world, multiple=chunk_size) cuts there)")


def _bank(gathered, counts, rank, K, V):
    """(bank_F [B,H,n,K,V], bank_h [B,H,n,M]) of the chunks of ranks before ``rank``."""
    parts = [gathered[s, :, :, :counts[s]] for s in range(rank)]
    bank = torch.cat(parts, 2)
    return bank[..., :K * V].unflatten(-1, (K, V)).contiguous(), bank[..., K * V:].contiguous()


def bsbr_attention_cp(q, k, v, r, hk, *, chunk_size, top_k=None, scale=None, long_scale=1.0,
                      backend="auto", launch=None, group=None):
    """`kernels.bsbr.bsbr_attention` over a sequence split along time across the ranks of
    ``group`` (default: the whole world), the ranks holding consecutive pieces in rank order,
    the sequence starting at a chunk boundary on rank 0 (no offset, no bank before it).

    Every rank passes its own q, k [B,H,L_r,K], v [B,H,L_r,V], r, hk [B,H,L_r,M]; every rank
    but the last must hold a multiple of chunk_size tokens (ValueError on every rank
    otherwise). B, H, K, V, M, chunk_size, top_k, scale and long_scale must agree. Returns this
    rank's o [B,H,L_r,V], exactly that of one call on the whole sequence; differentiable in q,
    k, v, r, hk. Every rank must run the backward (the bank's gradients travel in a
    collective). A bad input on any rank raises on every rank."""
    rank, world = rank_and_world(group)
    error, sizes = None, [-1] * 6
    try:
        d = check_bsbr_inputs(q, k, v, r, hk, chunk_size, top_k, 0, None, None, scale)
        check_long_scale(long_scale)
        sizes = [d.Tq, d.B, d.H, d.K, d.V, d.M]
    except (ValueError, TypeError) as e:
        error = e
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, r, hk))
    wide = isinstance(q, torch.Tensor) and q.dtype == torch.float64    # float64 chunk states
    table = agree_on_inputs([*sizes, chunk_size, top_k or 0, wide, needs_grad], error, group)
    require_equal(table, ("B", "H", "K", "V", "M", "chunk_size", "top_k",
                          "q dtype (float64 or not)",
                          "grad mode (whether an input needs a gradient)"), first=1)
    lengths = table[:, 0].tolist()
    check_cuts(lengths, chunk_size)
    kw = dict(chunk_size=chunk_size, top_k=top_k, scale=scale, long_scale=long_scale,
              backend=backend, launch=launch)
    counts = [L // chunk_size for L in lengths[:-1]] + [0]   # the last rank's chunks: no reader
    if max(counts) == 0:
        return bsbr_attention(q, k, v, r, hk, **kw)      # no rank has a chunk to share
    _, B, H, K, V, M = sizes
    if counts[rank]:
        F_own, h_own = chunk_states(k, v, hk, chunk_size=chunk_size, backend=backend,
                                    launch=launch)
        payload = torch.cat([F_own.flatten(-2), h_own.to(F_own.dtype)], -1)
    else:
        payload = q.new_zeros(B, H, 0, K * V + M,
                              dtype=torch.float64 if wide else torch.float32)
    # One collective for both: [B,H,n,K·V+M], padded to the most chunks any rank holds.
    payload = F.pad(payload, (0, 0, 0, max(counts) - counts[rank]))
    gathered = gather_ranks(payload, group, needs_grad)
    if sum(counts[:rank]) == 0:
        return join(bsbr_attention(q, k, v, r, hk, **kw), gathered)
    bank_F, bank_h = _bank(gathered, counts, rank, K, V)
    return bsbr_attention(q, k, v, r, hk, bank_F=bank_F, bank_h=bank_h, **kw)

"""Packed sequences (``cu_seqlens``, fla's convention: kernels/varlen.py) on one chunk-aligned row.

N sequences packed along time, [1, H, total, ·] with offsets cu_seqlens [N + 1]. Every BSBR
op computes each sequence as if it were called alone: its own chunk grid from its first token,
the local softmax inside its own chunks, the routing over its own completed chunks only.

How: the sequences are laid out on one row on which each starts at a chunk boundary (sequence
i padded at its end to a multiple of C, at most C - 1 zero rows each):

    lengths 5, 2, 9 at C = 4      row  |a a a a|a . . .|b b . .|c c c c|c c c c|c . . .|
                                  chunk    0       1       2       3       4       5
                                  lo       0       0       2       3       3       3

On that row the chunks of one long sequence are exactly the sequences' own chunks, so the local
attention and the chunk states run unchanged: a pad follows every real token of its chunk, so
no real query sees one (causal masking), and pads lie only in a sequence's last, incomplete
chunk, which no query of any sequence routes to. The one change is in the routing: a query of
chunk c reads the chunks j with lo[c] <= j < c, lo[c] the first chunk of c's sequence
(`routing.route(chunk_lo=...)`). The readout reads what the routing picked. Pad queries are
computed and dropped; their gradient is zero.

Cost: one copy of each input into the row and one gather of the output (memory-bound,
O(total · dim)), at most N · (C - 1) extra rows of work, and one host read of cu_seqlens (its
checks need the offsets) per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..varlen import checked_offsets, seq_lengths


class VarlenStates(NamedTuple):
    """`chunk_states(..., cu_seqlens=...)`: the complete chunks of every sequence, packed along
    the chunk axis in sequence order, as the tokens are along time.

    F [1, H, n, K, V], h [1, H, n, M]   n = Σ_i L_i // C
    cu_chunks [N + 1]                   sequence i's states: F[:, :, cu_chunks[i]:cu_chunks[i+1]]
    tails [N] int64                     L_i % C: sequence i's last tails[i] tokens are its
                                        partial chunk (not in F, h)

    A stream that continues sequence i takes its states as the bank and its tail tokens as the
    partial chunk (offset = tails[i]). `kernels.varlen.unpack(F, cu_chunks)` gives the states
    right-padded per sequence, [N, H, max n_i, K, V]."""
    F: torch.Tensor
    h: torch.Tensor
    cu_chunks: torch.Tensor
    tails: torch.Tensor


def _ranges(starts, counts, total):
    """The concatenated arange(s, s + n) over (starts, counts) (int64 tensors; total = Σ counts,
    known on the host), built on their device without a loop over the ranges."""
    begin = torch.cumsum(counts, 0) - counts            # where each range begins in the result
    return torch.repeat_interleave(starts - begin, counts, output_size=total) \
        + torch.arange(total, device=counts.device)


@dataclass(frozen=True)
class ChunkRow:
    """Where the packed tokens and chunks of N sequences lie on the chunk-aligned row (see the
    module docstring)."""
    rows: int                     # length of the row: a multiple of the chunk size
    pos: torch.Tensor             # [total] int64: the row position of each packed token
    chunk_lo: torch.Tensor        # [rows // C] int32: the first chunk of each chunk's sequence
    most_candidates: int          # the most chunks any query may read: max_i (L_i - 1) // C
    complete: torch.Tensor        # [n] int64: the row chunk of each sequence's complete chunks
    cu_chunks: torch.Tensor       # [N + 1], cu_seqlens' dtype: offsets of those per sequence
    tails: torch.Tensor           # [N] int64: L_i % C


def chunk_row(cu_seqlens: torch.Tensor, total: int, chunk_size: int) -> ChunkRow:
    """The row of the sequences cu_seqlens packs into ``total`` tokens (checked first). The
    sizes come from the offsets read on the host, the index tensors from cu_seqlens on its
    device (nothing is copied from the host)."""
    offsets = checked_offsets(cu_seqlens, total, cu_seqlens.device)     # the one host read
    C = chunk_size
    host = [b - a for a, b in zip(offsets, offsets[1:])]
    lengths = seq_lengths(cu_seqlens)
    chunks = (lengths + C - 1) // C                      # row chunks of each sequence
    first = torch.cumsum(chunks, 0) - chunks
    full = lengths // C
    n_chunks = sum(-(-L // C) for L in host)
    return ChunkRow(
        rows=C * n_chunks,
        pos=_ranges(C * first, lengths, total),
        chunk_lo=torch.repeat_interleave(first, chunks, output_size=n_chunks).to(torch.int32),
        most_candidates=max(((L - 1) // C for L in host if L), default=0),
        complete=_ranges(first, full, sum(L // C for L in host)),
        cu_chunks=torch.cat([full.new_zeros(1), torch.cumsum(full, 0)]).to(cu_seqlens.dtype),
        tails=lengths % C)


def to_row(x: torch.Tensor, row: ChunkRow) -> torch.Tensor:
    """Packed [1, H, total, D] (any strides) -> the row [1, H, rows, D], zeros in the pads, stored
    head-major. Differentiable (its gradient is the gather of the row's gradient)."""
    out = x.new_zeros(x.shape[0], x.shape[1], row.rows, x.shape[3])
    return out.index_copy(2, row.pos, x)


def from_row(y: torch.Tensor, row: ChunkRow, bthk: bool) -> torch.Tensor:
    """The row [1, H, rows, D] -> the packed tokens [1, H, total, D], stored in the caller's
    layout (token-major when ``bthk``: one gather writes it, no transpose copy after)."""
    if bthk:
        return y.transpose(1, 2).index_select(1, row.pos).transpose(1, 2)
    return y.index_select(2, row.pos)


def row_states(F: torch.Tensor, h: torch.Tensor, row: ChunkRow) -> VarlenStates:
    """The row's chunk states -> each sequence's complete chunks (`VarlenStates`)."""
    return VarlenStates(F.index_select(2, row.complete), h.index_select(2, row.complete),
                        row.cu_chunks, row.tails)

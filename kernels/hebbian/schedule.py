"""Which chunks one launch of each chunked kernel covers: a call's tokens cut into segments
(function.py walks them, and one segment's per-chunk states are what memory holds at once).

Dense batch [B, H, T, ·]: a segment is the tokens [t0, t0 + nts·BT) of every row; its chunk i
starts at t0 + i·BT.

Packed varlen row [1, H, total_T, ·] with ``cu_seqlens``: chunks are aligned to each sequence's
start (no chunk spans two sequences; a sequence's last chunk may be short), and a segment is a
run of consecutive chunks of the row. Sequences are cut only at multiples of ``cut`` tokens from
their start, ``cut`` the larger of the forward's and the backward's chunk: both passes then cut
every sequence at the same token, so the backward restarts each segment from the state the
forward kept there. At most one sequence runs across a cut; its state crosses in a carry
[H, K, V], and every other sequence of a segment starts from its initial state and ends in its
final state. The kernels read two int32 tables per segment (common._walk, common._chunk_span):

    seqs   [rows, 8]  per sequence of the segment (one state-kernel program per row and head):
                      its first token here (packed position), the end of the sequence, its
                      chunks here, the buffer slot of the first, its index n (the row of the
                      initial and final states), flags (1: starts from the carry, 2: ends in it),
                      two unused (32-byte rows keep ``chunks`` 16-byte aligned after it, so the
                      pointer's alignment, a specialisation key, never depends on N)
    chunks [nts, 2]   per chunk (one chunk-kernel program each): its first token and the end
                      of its sequence

A segment holds at most seg_tokens / BT chunks however short the sequences are, and at most
``max_rows`` sequences (the state kernels put rows·H on a grid axis capped at 65535).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """What one launch of each kernel covers. nts: chunks (the per-chunk buffers' length and the
    chunk kernels' grid); rows: state rows walked (B dense, the segment's sequences varlen);
    [t_lo, t_hi): the tokens covered (packed positions varlen); t0: a dense segment's first
    token; seqs, chunks: the varlen tables (None for a dense batch)."""
    nts: int
    rows: int
    t_lo: int
    t_hi: int
    t0: int = 0
    seqs: torch.Tensor | None = None
    chunks: torch.Tensor | None = None


def dense_segments(B: int, T: int, seg_tokens: int, BT: int) -> list[Segment]:
    """Segments of ``seg_tokens`` tokens (a multiple of BT) over every row of a [B, ·, T, ·]
    batch; none when T = 0."""
    return [Segment(nts=math.ceil(min(seg_tokens, T - t0) / BT), rows=B, t_lo=t0,
                    t_hi=min(t0 + seg_tokens, T), t0=t0) for t0 in range(0, T, seg_tokens)]


@dataclass(frozen=True)
class Piece:
    """The part of sequence n in one segment: packed tokens [start, end), its sequence ending at
    seq_end; carry_in: it began in an earlier segment; carry_out: it goes on in the next."""
    n: int
    start: int
    end: int
    seq_end: int
    carry_in: bool
    carry_out: bool


def cut_sequences(offsets, cut: int, seg_tokens: int, max_rows: int) -> list[list[Piece]]:
    """The segments of a packed row with sequence offsets ``offsets`` (cu_seqlens, host ints):
    at most seg_tokens / cut units of ``cut`` tokens (a sequence's last unit may be short) and at
    most ``max_rows`` pieces each. Empty sequences get an empty piece (their final state is their
    initial one), so every sequence appears in exactly one segment or, cut, in consecutive ones."""
    per_segment = seg_tokens // cut
    if offsets[-1] >= 2 ** 31:
        raise ValueError(f"cu_seqlens: the tables hold positions in int32, got a packed length "
                         f"of {offsets[-1]} tokens")
    if per_segment < 1 or max_rows < 1:
        raise ValueError(f"seg_tokens, max_rows: expected seg_tokens >= cut = {cut} and "
                         f"max_rows >= 1, got {seg_tokens} and {max_rows}")
    segments, pieces, used = [], [], 0
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        start = bos
        while True:
            if len(pieces) == max_rows or (used == per_segment and start < eos):
                segments.append(pieces)
                pieces, used = [], 0
            units = min(math.ceil((eos - start) / cut), per_segment - used)
            end = min(start + units * cut, eos)
            pieces.append(Piece(n, start, end, eos, start > bos, end < eos))
            used += units
            start = end
            if start >= eos:
                break
    if pieces:
        segments.append(pieces)
    return segments


def varlen_segment(pieces: list[Piece], BT: int, device) -> Segment:
    """The tables of one segment at chunk BT, copied to ``device`` in one transfer."""
    rows = torch.tensor([[p.start, p.seq_end, math.ceil((p.end - p.start) / BT), 0, p.n,
                          int(p.carry_in) | 2 * int(p.carry_out), 0, 0] for p in pieces],
                        dtype=torch.int64)
    counts = rows[:, 2]
    rows[:, 3] = torch.cumsum(counts, 0) - counts                     # first buffer slot
    owner = torch.repeat_interleave(torch.arange(len(pieces)), counts)
    nts = int(counts.sum())
    step = torch.arange(nts) - rows[owner, 3]
    chunks = torch.stack([rows[owner, 0] + step * BT, rows[owner, 1]], 1)
    both = torch.cat([rows.flatten(), chunks.flatten()]).to(torch.int32).to(device)
    live = [p for p in pieces if p.end > p.start]
    t_lo, t_hi = (live[0].start, live[-1].end) if live else (0, 0)
    return Segment(nts=nts, rows=len(pieces), t_lo=t_lo, t_hi=t_hi,
                   seqs=both[:rows.numel()].view(-1, 8), chunks=both[rows.numel():].view(-1, 2))

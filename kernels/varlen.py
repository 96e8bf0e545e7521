"""Variable-length batches in fla's convention: N sequences packed along time into one row,
[1, H, total_T, dim], with ``cu_seqlens`` [N + 1] the offsets of their starts (0 first, total_T
last). Every op that takes ``cu_seqlens`` treats each sequence as if it had been called alone.

    lengths 3, 5, 2   ->   cu_seqlens = [0, 3, 8, 10]

What every varlen op shares: checking the offsets, and moving between the packed row and a
right-padded batch [N, H, max_T, dim] (the form a per-sequence reference, or a kernel without
native varlen support, works on).
"""
from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device) -> int:
    """Validate ``cu_seqlens`` for a packed row of ``total`` tokens on ``device``; returns N.

    Reads the offsets on the host (one sync); a caller on a hot path (decoding) should check
    once and reuse them."""
    return len(checked_offsets(cu_seqlens, total, device)) - 1


def checked_offsets(cu_seqlens, total: int, device: torch.device) -> list[int]:
    """`check_cu_seqlens`, returning the N + 1 offsets read on the host (the one sync), for an op
    that needs them there (to cut its work at the sequence boundaries)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32 or int64 tensor [N + 1], got "
                        f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D int32 or int64 tensor [N + 1] with N >= 1, "
                         f"got {cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected device {device} (the inputs'), got "
                         f"{cu_seqlens.device}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"cu_seqlens: expected offsets from 0 to the packed length {total}, "
                         f"got {offsets[0]} … {offsets[-1]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {offsets}")
    return offsets


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The N sequence lengths, [N] int64 on cu_seqlens' device."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def padded_index(cu_seqlens: torch.Tensor, max_len: int):
    """For a right-padded batch [N, max_len]: (gather index into the packed row [N, max_len],
    valid mask [N, max_len]). Padded slots point at token 0 and are masked out."""
    lengths = seq_lengths(cu_seqlens)
    t = torch.arange(max_len, device=cu_seqlens.device)
    valid = t[None, :] < lengths[:, None]
    index = (cu_seqlens[:-1, None].long() + t[None, :]).masked_fill(~valid, 0)
    return index, valid


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None,
           dim: int = 2) -> torch.Tensor:
    """Packed [1, ..., total_T (at ``dim``), ...] -> right-padded [N, ..., max_len, ...], zeros in
    the padding. Differentiable (a gather)."""
    if max_len is None:
        max_len = int(seq_lengths(cu_seqlens).max()) if cu_seqlens.numel() > 1 else 0
    index, valid = padded_index(cu_seqlens, max_len)
    row = x.squeeze(0).movedim(dim - 1, 0)                 # [total_T, ...]
    out = row[index.reshape(-1)].reshape(*index.shape, *row.shape[1:])      # [N, max_len, ...]
    mask = valid.reshape(*valid.shape, *([1] * (row.dim() - 1)))
    return out.masked_fill(~mask, 0).movedim(1, dim)


def pack(x: torch.Tensor, cu_seqlens: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Right-padded [N, ..., max_len (at ``dim``), ...] -> packed [1, ..., total_T, ...] (drops
    the padding). Differentiable (an index_select of the valid slots)."""
    max_len = x.shape[dim]
    index, valid = padded_index(cu_seqlens, max_len)
    flat = x.movedim(dim, 1).reshape(-1, *x.movedim(dim, 1).shape[2:])      # [N·max_len, ...]
    keep = (torch.arange(valid.numel(), device=x.device)
            .reshape(valid.shape)[valid])                  # row-major order = packed order
    return flat[keep].movedim(0, dim - 1).unsqueeze(0)

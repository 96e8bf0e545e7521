"""Chunk-local causal softmax attention in blockwise PyTorch: the keys are cut into chunks of
C and every chunk runs causal SDPA on its own, so the largest score block is C×C (memory
O(T·C)), never T×T. The complete chunks run as one batched SDPA; the last, partial chunk (or
the only one, when C >= T) runs on its own at its true length, so nothing is padded to C and
memory follows T however large C is (C >= T is exact softmax attention). Queries are padded
in front by `offset` so query i lands at key index offset + i; those rows are computed and
dropped."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chunk_local_attention_torch(q, k, v, *, chunk_size, offset=0, scale=None):
    B, H, Tq, K = q.shape
    Tk, V = k.shape[2], v.shape[3]
    C = chunk_size
    if Tq == 0:
        return v.new_empty(B, H, 0, V)
    full = (Tk // C) * C                 # keys of the complete chunks
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    qp = F.pad(q, (0, 0, offset, 0))     # [B,H,Tk,K]: row p holds the query at key index p
    parts = []
    if full:
        n = full // C
        parts.append(F.scaled_dot_product_attention(
            qp[:, :, :full].reshape(B, H, n, C, K), k[:, :, :full].reshape(B, H, n, C, K),
            v[:, :, :full].reshape(B, H, n, C, V), is_causal=True,
            scale=scale).reshape(B, H, full, V))
    if full < Tk:
        parts.append(F.scaled_dot_product_attention(qp[:, :, full:], k[:, :, full:],
                                                     v[:, :, full:], is_causal=True, scale=scale))
    o = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
    return o[:, :, offset:]

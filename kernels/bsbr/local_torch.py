"""Chunk-local causal softmax attention in blockwise PyTorch: the keys are cut into chunks of
C and every chunk runs causal SDPA on its own, so the largest score block is C×C (memory
O(T·C)), never T×T. Queries are padded in front by `offset` so query i lands at key index
offset + i; padded rows are computed and dropped (at most C - 1 + C of them)."""
from __future__ import annotations

import math

import torch.nn.functional as F


def chunk_local_attention_torch(q, k, v, *, chunk_size, offset=0, scale=None):
    B, H, Tq, K = q.shape
    Tk, V = k.shape[2], v.shape[3]
    C = chunk_size
    nC = -(-Tk // C)
    tail = nC * C - Tk
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    qc = F.pad(q, (0, 0, offset, tail)).view(B, H, nC, C, K)
    kc = F.pad(k, (0, 0, 0, tail)).view(B, H, nC, C, K)
    vc = F.pad(v, (0, 0, 0, tail)).view(B, H, nC, C, V)
    # Causal inside the chunk: real queries never see the zero keys padded after Tk.
    o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
    return o.view(B, H, nC * C, V)[:, :, offset:offset + Tq]

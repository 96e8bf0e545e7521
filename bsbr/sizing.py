"""Sizing a BSBR language model to a parameter budget (for like-for-like comparisons)."""
from __future__ import annotations

import torch

from .config import BSBRLMConfig
from .model import BSBRLM


def match_bsbr_config(target_params: int, *, n_layer: int, n_head: int, block_size: int,
                      dropout: float) -> BSBRLMConfig:
    """The BSBR LM with ``n_layer`` blocks whose width (a multiple of 8·n_head) brings its
    parameter count closest to ``target_params``. Chunks of block_size/8 tokens (at least 8)
    and top-k 4, so a training block holds several completed chunks to route between."""
    if target_params <= 0:
        raise ValueError(f"target_params: expected a positive int, got {target_params!r}")

    def make(d):
        return BSBRLMConfig(n_layer=n_layer, d_model=d, n_head=n_head,
                            chunk_size=max(8, block_size // 8), top_k=4, dropout=dropout)

    def count(d):
        with torch.device("meta"):
            return sum(p.numel() for p in BSBRLM(make(d)).parameters())

    step = 8 * n_head
    return make(min(range(step, 64 * step + 1, step), key=lambda d: abs(count(d) - target_params)))

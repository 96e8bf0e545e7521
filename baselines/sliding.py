"""Sliding-window softmax attention on the streaming protocol.

Query t sees the keys s with t − w < s ≤ t (w keys, itself included), with RoPE at absolute
positions. Nothing older than w − 1 tokens is ever read again, so the state is a KV cache of
the last w − 1 tokens: bounded, whatever the context length.

Backends:
  "blocks" (default) queries in blocks of `block_size`; each block runs SDPA against only the
           keys its band can reach (block + w − 1 of them) with a boolean band mask, so memory is
           O(T·w) in total and O(block·(block + w)) at a time, never T×T.
  "flex"   `torch.nn.attention.flex_attention` with a sliding-window block mask (compiled on
           CUDA, where its fused kernel skips the masked-out tiles; on the CPU it has no backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .projected import ProjectedAttention, check_positive_int
from .rope import apply_rope
from .state import KVCacheState, check_state

SLIDING_BACKENDS = ("auto", "blocks", "flex")
_compiled_flex = None


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Tq, Tk] bool: key position s is visible from query position t iff t − w < s ≤ t."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window)


def sliding_sdpa_blocks(q, k, v, window: int, block_size: int) -> torch.Tensor:
    """q [B,H,Tq,d] are the last Tq of the Tk positions of k, v [B,H,Tk,d]."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    offset = Tk - Tq
    if Tk <= window:                                    # the band covers everything: causal
        if Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        band = band_mask(torch.arange(offset, Tk, device=q.device),
                         torch.arange(Tk, device=q.device), window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    outs = []
    for a in range(0, Tq, block_size):
        b = min(a + block_size, Tq)
        lo, hi = max(0, offset + a - window + 1), offset + b      # keys this block can see
        band = band_mask(torch.arange(offset + a, offset + b, device=q.device),
                         torch.arange(lo, hi, device=q.device), window)
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi],
                                                   attn_mask=band))
    return torch.cat(outs, dim=2)


def sliding_flex(q, k, v, window: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    global _compiled_flex
    Tq, Tk = q.shape[-2], k.shape[-2]
    offset = Tk - Tq

    def in_band(b, h, q_idx, kv_idx):
        diff = q_idx + offset - kv_idx
        return (diff >= 0) & (diff < window)

    mask = create_block_mask(in_band, None, None, Tq, Tk, device=q.device)
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=mask)


class SlidingWindowAttention(ProjectedAttention):
    """x [B,T,D] → y [B,T,D]; each token attends to itself and the w − 1 tokens before it.
    State: `KVCacheState` holding at most w − 1 tokens."""

    def __init__(self, d_model: int, n_head: int = 4, *, window: int = 256,
                 block_size: int | None = None, backend: str = "auto", rope: bool = True,
                 rope_theta: float = 10000.0, bias: bool = False):
        super().__init__(d_model, n_head, bias=bias)
        check_positive_int("window", window)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        if backend not in SLIDING_BACKENDS:
            raise ValueError(f"backend: expected one of {SLIDING_BACKENDS}, got {backend!r}")
        if rope and self.head_dim % 2:
            raise ValueError(f"rope: needs an even head_dim, got {self.head_dim} "
                             f"(d_model {d_model} / n_head {n_head})")
        self.window = window
        # Block ≈ window keeps the per-block key span (block + w − 1) at about 2w.
        self.block_size = block_size or max(64, min(window, 1024))
        self.backend, self.rope, self.rope_theta = backend, rope, rope_theta

    def forward(self, x: torch.Tensor, state: KVCacheState | None = None,
                return_state: bool = False):
        self.check_x(x)
        B, T, _ = x.shape
        position = 0
        if state is not None:
            check_state(state, KVCacheState, "SlidingWindowAttention", B,
                        (self.n_head, None, self.head_dim), x.device)
            if state.k.shape[2] > self.window - 1:
                raise ValueError(f"state: SlidingWindowAttention expected a cache of at most "
                                 f"window − 1 = {self.window - 1} tokens, got {state.k.shape[2]}")
            position = state.position
        q, k, v = self.qkv(x)
        if self.rope:
            q = apply_rope(q, position, self.rope_theta)
            k = apply_rope(k, position, self.rope_theta)
        if state is not None and state.k.shape[2]:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        if self.backend == "flex":
            o = sliding_flex(q, k, v, self.window)
        else:
            o = sliding_sdpa_blocks(q, k, v, self.window, self.block_size)   # "auto", "blocks"
        y = self.merge_heads(o)
        if not return_state:
            return y
        keep = self.window - 1
        start = max(0, k.shape[2] - keep)
        k_keep, v_keep = k[:, :, start:], v[:, :, start:]
        # Contiguous copies: a view would keep the whole piece's K/V alive in memory.
        return y, KVCacheState(k_keep.contiguous(), v_keep.contiguous(), position + T)

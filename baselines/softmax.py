"""Softmax attention (the transformer baseline) on the streaming protocol.

    o = softmax(q kᵀ / √d + causal mask) v      via F.scaled_dot_product_attention (SDPA)

Queries and keys get RoPE at their absolute positions. The state is the KV cache: every key and
value seen so far, so `nbytes()` grows linearly with the context. A piece that continues a
stream attends to all cached keys plus, causally, to its own: that is a lower-right-aligned
causal mask (`causal_lower_right`), which SDPA's fused kernels take without building T×T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .projected import ProjectedAttention
from .rope import apply_rope
from .state import KVCacheState, check_state


def causal_sdpa(q, k, v) -> torch.Tensor:
    """q [B,H,Tq,d] are the last Tq of the Tk positions of k, v: query i sees keys j ≤ Tk−Tq+i."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:                                      # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Tq, Tk))


class SoftmaxAttention(ProjectedAttention):
    """x [B,T,D] → y [B,T,D], causal softmax attention with RoPE; state: `KVCacheState`."""

    def __init__(self, d_model: int, n_head: int = 4, *, rope: bool = True,
                 rope_theta: float = 10000.0, bias: bool = False):
        super().__init__(d_model, n_head, bias=bias)
        if rope and self.head_dim % 2:
            raise ValueError(f"rope: needs an even head_dim, got {self.head_dim} "
                             f"(d_model {d_model} / n_head {n_head})")
        self.rope, self.rope_theta = rope, rope_theta

    def _qkv_at(self, x, position: int):
        q, k, v = self.qkv(x)
        if self.rope:
            q = apply_rope(q, position, self.rope_theta)
            k = apply_rope(k, position, self.rope_theta)
        return q, k, v

    def forward(self, x: torch.Tensor, state: KVCacheState | None = None,
                return_state: bool = False):
        self.check_x(x)
        B = x.shape[0]
        position = 0
        if state is not None:
            check_state(state, KVCacheState, type(self).__name__, B,
                        (self.n_head, None, self.head_dim), x.device)
            position = state.position
        q, k, v = self._qkv_at(x, position)
        if state is not None and state.k.shape[2]:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        y = self.merge_heads(causal_sdpa(q, k, v))
        if not return_state:
            return y
        return y, KVCacheState(k, v, position + x.shape[1])

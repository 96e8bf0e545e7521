"""Rotary position embedding for the softmax-type baselines (softmax, sliding window).

Without positions a causal softmax layer only sees token order through its mask; RoPE gives
the baselines the same relative-position signal modern transformers use. Half-split layout:
(x_i, x_{i+d/2}) rotate by angle p·θ^{−2i/d}. Angles are computed in float64 from absolute
positions (so a streamed piece at offset p gets exactly the angles of one long call) and the
rotation is applied in the input's dtype.
"""
from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """positions [T] int64 → angles [T, head_dim/2] float64."""
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    inv_freq = theta ** (-2.0 * i / head_dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


def apply_rope(x: torch.Tensor, position: int, theta: float = 10000.0) -> torch.Tensor:
    """x [B,H,T,d] (d even) for absolute positions position … position+T−1."""
    T, d = x.shape[-2], x.shape[-1]
    ang = rope_angles(torch.arange(position, position + T, device=x.device), d, theta)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

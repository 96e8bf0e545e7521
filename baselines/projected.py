"""The shared shell of the baseline attention modules: input checks and q/k/v/o projections.

Each baseline is `ProjectedAttention` + one mixing rule: x [B,T,D] → q, k, v [B,H,T,d]
(d = D / H) → mix → o [B,H,T,d] → concat heads → W_o → y [B,T,D].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from glassbrain.checks import check_sequence


def check_positive_int(name: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
    return val


class ProjectedAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, *, bias: bool = False):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_head", n_head)
        if d_model % n_head:
            raise ValueError(f"n_head: d_model ({d_model}) must be divisible by n_head, "
                             f"got n_head = {n_head}")
        self.d_model, self.n_head, self.head_dim = d_model, n_head, d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.o_proj.weight, std=1.0 / math.sqrt(d_model))

    def check_x(self, x) -> None:
        check_sequence(x, self.d_model)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # [B,H,T,d]

    def qkv(self, x: torch.Tensor):
        return (self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x)),
                self.split_heads(self.v_proj(x)))

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, d = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d))

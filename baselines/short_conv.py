"""A causal depthwise "short convolution" over time, with a streaming state.

    y_t = b + Σ_{i=0}^{k-1} w_{k-1-i} ⊙ x_{t-i}          (x_{t} = 0 before the first token)

Why: the mixers here see content, not positions (no position embedding). Binding a key to the
token after it — the step every associative-recall task needs — then has to be learned from
the causal mask alone, which is slow: on MQAR (BENCHMARKS.md, long-range memory) every mixer
without it sat at ~20% train accuracy for 3,000+ steps. A width-k depthwise convolution in
front of the mixer hands each position its k-1 predecessors, as the short convolutions of H3,
Mamba, Zoology's models and fla's layers do. The state is the last k-1 inputs, a fixed size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .projected import check_positive_int


class ShortConv(nn.Module):
    def __init__(self, d_model: int, kernel_size: int):
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("kernel_size", kernel_size)
        self.d_model, self.kernel_size = d_model, kernel_size
        conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)   # its default init
        self.weight, self.bias = conv.weight, conv.bias                   # [D, 1, k], [D]

    def forward(self, x, state=None, return_state: bool = False):
        """x [B,T,D]; state None or [B, k-1, D] (the previous k-1 inputs). Returns y [B,T,D]
        (and the new state with return_state=True)."""
        B, T, D = x.shape
        if D != self.d_model:
            raise ValueError(f"x: expected shape [B,T,D] with D = {self.d_model}, "
                             f"got {list(x.shape)}")
        k = self.kernel_size
        if state is None:
            state = x.new_zeros(B, k - 1, D)
        elif tuple(state.shape) != (B, k - 1, D):
            raise ValueError(f"state: expected the short convolution's history [B, k-1, D] = "
                             f"{[B, k - 1, D]}, got {list(state.shape)}")
        xx = torch.cat([state.to(x.dtype), x], dim=1)                     # [B, k-1+T, D]
        y = F.conv1d(xx.transpose(1, 2), self.weight.to(x.dtype), self.bias.to(x.dtype),
                     groups=D).transpose(1, 2)
        if not return_state:
            return y
        return y, xx[:, xx.shape[1] - (k - 1):]


class ConvMixerState:
    """A block's streaming state when it has a short convolution: its history and the mixer's
    own state."""

    def __init__(self, conv: torch.Tensor, mixer):
        self.conv, self.mixer = conv, mixer

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.mixer.nbytes()

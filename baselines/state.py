"""Streaming states of the baseline attention modules.

`KVCacheState`: the keys and values a softmax-type module keeps (all of them for softmax, the
last w − 1 for a sliding window), so its size grows with the context (or with w).
`RecurrentState`: one fixed-size matrix per head (linear attention, DeltaNet), whatever the
context length. Both carry `position`, the number of tokens consumed (RoPE continues from it).
States are values: a module never modifies a state it was given, it returns a new one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class KVCacheState:
    """k, v [B,H,L,head_dim]: the cached keys (after RoPE) and values; position: tokens seen."""
    k: torch.Tensor
    v: torch.Tensor
    position: int = 0

    def nbytes(self) -> int:
        return _bytes(self.k, self.v)


@dataclass
class RecurrentState:
    """S [B,H,K,V] float32: the whole memory of the past; position: tokens seen."""
    S: torch.Tensor
    position: int = 0

    def nbytes(self) -> int:
        return _bytes(self.S)


def check_state(state, cls, owner: str, batch_size: int, shape_tail: tuple, device) -> None:
    """Raise TypeError / ValueError unless ``state`` is a ``cls`` for this batch, shape and device.
    shape_tail: the expected shape after the batch dim (None entries are not checked)."""
    if not isinstance(state, cls):
        raise TypeError(f"state: {owner} expected a {cls.__name__} or None, "
                        f"got {type(state).__name__}")
    t = state.k if cls is KVCacheState else state.S
    want = (batch_size,) + tuple(shape_tail)
    if t.dim() != len(want) or any(w is not None and w != g for w, g in zip(want, t.shape)):
        raise ValueError(f"state: {owner} expected a state of shape "
                         f"{[('*' if w is None else w) for w in want]}, got {list(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"state: {owner} expected a state on {device}, got {t.device}")

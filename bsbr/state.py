"""The BSBR streaming state: a bank of chunk states plus the current partial chunk.

A BSBR layer's memory of the past is
  * the bank: one (F, h) per slot, F = Σ k_sᵀ v_s over the chunks the slot holds (float32;
    float64 in float64 oracle runs) and h their mean meta key, with each slot's level
    (compression 2^level chunks), its chunk count and its salience;
  * the keys, values and meta-key sources of the current partial chunk (fewer than C tokens),
    kept in a fixed buffer of C - 1 tokens so the state's size does not move inside a chunk
    (no meta-key buffer where the meta key source is the key itself, as in the transformers
    drop-in);
  * the position (tokens consumed), whose remainder mod C is how many of those are filled.
`BSBRRows` holds the same for B rows at different positions, every count on the device (the
layout of `kernels.bsbr.bsbr_rows_step`, for the transformers cache).
With a bounded bank (`BankConfig`) the slot tensors are allocated at the bank's capacity, so
`nbytes()` is the same at every position: O(slots · K · V) for any length.
"""
from __future__ import annotations

import dataclasses

import torch


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _assign_tensors(obj, other, names) -> None:
    """``other``'s tensors ``names`` copied into ``obj``'s where the shapes agree (the buffers
    keep their addresses), taken over where they do not."""
    for name in names:
        mine, theirs = getattr(obj, name), getattr(other, name)
        if theirs is mine:
            continue
        if mine.shape == theirs.shape:
            mine.copy_(theirs)
        else:
            setattr(obj, name, theirs)


@dataclasses.dataclass
class BankState:
    """Bank slots, per (batch, head). Only the first n = len(levels) slots are valid (the rest is
    zero padding up to the bounded bank's capacity).

    F [B,H,S,K,V], h [B,H,S,M] (float32, or float64), salience [B,H,S] (float32/64, no grad).
    levels[i]: slot i's level (0 = one raw chunk, l = 2^l chunks merged; the archive slot has
    level n_levels). counts[i]: how many chunks slot i holds. Slots are in chronological order:
    archive first, then the top level's, ..., level 0's (newest last); levels never increase
    along the slots."""
    F: torch.Tensor
    h: torch.Tensor
    salience: torch.Tensor
    levels: tuple = ()
    counts: tuple = ()

    def __post_init__(self):
        self.levels, self.counts = tuple(self.levels), tuple(self.counts)
        if len(self.levels) != len(self.counts) or len(self.levels) > self.F.shape[2]:
            raise ValueError(f"BankState: {len(self.levels)} levels, {len(self.counts)} counts "
                             f"and {self.F.shape[2]} slot tensors do not fit together")

    @property
    def n(self) -> int:
        """Valid slots."""
        return len(self.levels)

    @property
    def n_chunks(self) -> int:
        """Completed chunks the bank has absorbed (merged and archived ones included)."""
        return sum(self.counts)

    def valid(self):
        """(F, h, salience) of the valid slots, or (None, None, None) for an empty bank."""
        if self.n == 0:
            return None, None, None
        n = self.n
        return self.F[:, :, :n], self.h[:, :, :n], self.salience[:, :, :n]

    def nbytes(self) -> int:
        return _tensor_bytes(self.F, self.h, self.salience)

    def _map(self, fn) -> "BankState":
        return BankState(fn(self.F), fn(self.h), fn(self.salience), self.levels, self.counts)

    def assign_(self, other: "BankState") -> None:
        """Become ``other``: its tensors copied into this bank's where the shapes agree (a
        bounded bank keeps its buffers), taken over where they do not (the exact bank grows)."""
        _assign_tensors(self, other, ("F", "h", "salience"))
        self.levels, self.counts = other.levels, other.counts


@dataclasses.dataclass
class BSBRState:
    """The state of one BSBRAttention over a batch.

    bank: the slots of the completed chunks. k [B,H,C-1,K], v [B,H,C-1,V], hk [B,H,C-1,M] or
    None (the meta key source is k itself): the partial chunk, of which the first ``fill`` =
    position mod C tokens are filled.
    config: the shape fields of the module that made it (a module refuses a mismatching one)."""
    bank: BankState
    k: torch.Tensor
    v: torch.Tensor
    hk: torch.Tensor | None
    position: int = 0
    config: dict | None = None

    def __post_init__(self):
        if isinstance(self.position, bool) or not isinstance(self.position, int) \
                or self.position < 0:
            raise ValueError(f"BSBRState.position: expected an int >= 0, got {self.position!r}")

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def fill(self) -> int:
        """Tokens of the current partial chunk held (position mod C)."""
        return self.position % (self.k.shape[2] + 1)

    def partial(self):
        """(k, v, hk) of the partial chunk's filled tokens (hk None without a meta-key buffer)."""
        f = self.fill
        return (self.k[:, :, :f], self.v[:, :, :f],
                None if self.hk is None else self.hk[:, :, :f])

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return self.bank.nbytes() + _tensor_bytes(self.k, self.v, self.hk)

    def map_tensors(self, fn) -> "BSBRState":
        """A state with ``fn`` applied to each of its tensors (all batch first): beam reorders,
        device moves, copies."""
        return BSBRState(self.bank._map(fn), fn(self.k), fn(self.v),
                         None if self.hk is None else fn(self.hk), self.position,
                         None if self.config is None else dict(self.config))

    def clone(self) -> "BSBRState":
        return self.map_tensors(torch.Tensor.clone)

    def detach(self) -> "BSBRState":
        """Cut the autograd graph (truncated backpropagation through time)."""
        return self.map_tensors(torch.Tensor.detach)

    def to(self, device) -> "BSBRState":
        return self.map_tensors(lambda t: t.to(device))


@dataclasses.dataclass
class BSBRRows:
    """The BSBR states of B independent rows, each at its own position (a transformers cache's
    layer over a padded batch), laid out for `kernels.bsbr.bsbr_rows_step`: every count on the
    device, so a decode step reads nothing back to the host. The meta key source is the key
    itself (the drop-in's routing: r = q, hk = k).

    k [B,H,C-1,K], v [B,H,C-1,V]: the partial chunks, the first fill[b, h] tokens of each
    filled; fill [B,H] int32. F [B,H,S,K,V], h [B,H,S,K], salience [B,H,S]: float32 slots, and
    counts [B,H,L+1] int32 (the archive's chunks, then the used slots of each level), where
    ``layout`` (a `kernels.bsbr.RowsLayout`) places them. bank: the bounded bank's BankConfig,
    or None for the exact bank, whose single level the owner grows (`grown`).

    With a bounded bank every tensor has one shape for the life of the state (``capturable``)."""
    k: torch.Tensor
    v: torch.Tensor
    fill: torch.Tensor
    F: torch.Tensor
    h: torch.Tensor
    salience: torch.Tensor
    counts: torch.Tensor
    layout: object
    bank: object = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def chunk_size(self) -> int:
        return self.k.shape[2] + 1

    @property
    def capturable(self) -> bool:
        return self.layout.bounded

    def tensors(self) -> tuple:
        return self.k, self.v, self.fill, self.F, self.h, self.salience, self.counts

    def nbytes(self) -> int:
        return _tensor_bytes(*self.tensors())

    def map_tensors(self, fn) -> "BSBRRows":
        """A state with ``fn`` applied to each tensor (all batch first)."""
        return BSBRRows(*(fn(t) for t in self.tensors()), self.layout, self.bank)

    def clone(self) -> "BSBRRows":
        return self.map_tensors(torch.Tensor.clone)

    def assign_(self, other: "BSBRRows") -> None:
        """Become ``other``: copied into this state's tensors where the shapes agree, taken over
        where they do not (the exact bank grown)."""
        _assign_tensors(self, other, ("k", "v", "fill", "F", "h", "salience", "counts"))
        self.layout, self.bank = other.layout, other.bank


@dataclasses.dataclass
class BSBRLMState:
    """The state of a BSBR language model: one BSBRState per layer, and the position."""
    layers: list
    position: int = 0
    config: dict | None = None

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)

    def _map(self, name) -> "BSBRLMState":
        return BSBRLMState([getattr(s, name)() for s in self.layers], self.position,
                           None if self.config is None else dict(self.config))

    def clone(self) -> "BSBRLMState":
        return self._map("clone")

    def detach(self) -> "BSBRLMState":
        return self._map("detach")

    def to(self, device) -> "BSBRLMState":
        return BSBRLMState([s.to(device) for s in self.layers], self.position,
                           None if self.config is None else dict(self.config))

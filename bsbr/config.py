"""BSBR configuration: the hierarchical state bank and the small BSBR language model.

The attention module takes its sizes as arguments (`BSBRAttention(d_model, n_head, ...)`); the
configs here are the two things that travel as a unit: a bank's budget and policy, and a whole
model's sizes.
"""
from __future__ import annotations

import dataclasses

from glassbrain.checks import check_int, check_optional_int
from kernels.bsbr import BACKENDS
from kernels.bsbr.validate import check_long_scale as check_routed_scale


def check_long_scale(long_scale, name: str) -> None:
    """λ of BSBR's routed term: None (the default, `resolve_long_scale`) or what the kernels
    take (`kernels.bsbr.validate.check_long_scale`: a finite number > 0)."""
    if long_scale is not None:
        check_routed_scale(long_scale, f"{name} (None for scale / chunk_size)")


def resolve_long_scale(long_scale, scale: float, chunk_size: int) -> float:
    """The λ a layer uses: ``long_scale``, or by default scale / chunk_size, so a routed chunk
    adds the chunk-mean of (scale · q·k) v (see `bsbr.attention`)."""
    return scale / chunk_size if long_scale is None else float(long_scale)


@dataclasses.dataclass(frozen=True)
class BankConfig:
    """A bounded hierarchical state bank (the design of BWR-DNC).

    slots_per_level[l] slots hold states of 2^l chunks each. A completed chunk enters level 0;
    when a level below the top is full, its two oldest slots merge (F summed, h averaged) into
    one slot of the next level; when the top level is full, its lowest-salience slot folds into
    the single archive slot (F summed, h averaged weighted by the chunks each holds). Every
    non-top level needs at least 2 slots (a merge takes two), the top level at least 1.

    salience_decay: per token. A slot's salience is Σ over past queries of the routing weight it
    received, times salience_decay^(tokens since that query); a merged slot sums its parents'.
    Memory: sum(slots_per_level) + 1 slots of K·V + M floats per head, for any length. While the
    number of completed chunks is at most slots_per_level[0] nothing merges and the bank is
    exact.
    """
    slots_per_level: tuple = (8, 4, 4)
    salience_decay: float = 0.999

    def __post_init__(self):
        spl = self.slots_per_level
        if not isinstance(spl, (tuple, list)) or len(spl) < 1:
            raise TypeError(f"BankConfig.slots_per_level: expected a non-empty tuple of ints, "
                            f"got {spl!r}")
        object.__setattr__(self, "slots_per_level", tuple(spl))
        for lvl, n in enumerate(spl):
            top = lvl == len(spl) - 1
            check_int(f"BankConfig.slots_per_level[{lvl}]", n, 1 if top else 2)
        d = self.salience_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"BankConfig.salience_decay: expected a float in (0, 1], got {d!r}")

    @property
    def n_levels(self) -> int:
        return len(self.slots_per_level)

    @property
    def capacity(self) -> int:
        """Slots held at most, the archive included."""
        return sum(self.slots_per_level) + 1

    def as_dict(self) -> dict:
        return {"slots_per_level": list(self.slots_per_level),
                "salience_decay": float(self.salience_decay)}


def bank_from(value) -> BankConfig | None:
    """None (the exact, unbounded bank), a BankConfig, or its dict / tuple of slots."""
    if value is None or isinstance(value, BankConfig):
        return value
    if isinstance(value, dict):
        return BankConfig(**value)
    if isinstance(value, (tuple, list)):
        return BankConfig(slots_per_level=tuple(value))
    raise TypeError(f"bank: expected None, a BankConfig, a dict of its fields or a tuple of "
                    f"slots per level, got {type(value).__name__} {value!r}")


@dataclasses.dataclass
class BSBRLMConfig:
    """A small BSBR language model: byte embedding, n_layer pre-LN blocks (BSBR attention + MLP),
    final LN, LM head. No position embedding: the causal local softmax sees order, and the model
    runs at any length. meta_dim None = the head dim; bank None = the exact bank; long_scale None
    = 1/(√head_dim · chunk_size) (see `bsbr.attention`; 1.0 is the plain sum)."""
    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    chunk_size: int = 64
    top_k: int | None = None
    meta_dim: int | None = None
    mlp_ratio: int = 4
    dropout: float = 0.0
    bank: BankConfig | None = None
    backend: str = "auto"
    long_scale: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "chunk_size", "mlp_ratio"):
            check_int(f"BSBRLMConfig.{name}", getattr(self, name), 1)
        check_optional_int("BSBRLMConfig.top_k", self.top_k, 1)
        check_optional_int("BSBRLMConfig.meta_dim", self.meta_dim, 1)
        if self.d_model % self.n_head:
            raise ValueError(f"BSBRLMConfig.d_model: expected a multiple of n_head = "
                             f"{self.n_head}, got {self.d_model}")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"BSBRLMConfig.dropout: expected a float in [0, 1), got {d!r}")
        self.bank = bank_from(self.bank)
        check_long_scale(self.long_scale, "BSBRLMConfig.long_scale")
        if self.backend not in BACKENDS:
            raise ValueError(f"BSBRLMConfig.backend: expected one of {BACKENDS}, "
                             f"got {self.backend!r}")

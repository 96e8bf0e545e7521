"""BDH configuration: the official pathwaycom/bdh defaults plus Glass Brain's runtime options."""
from __future__ import annotations

import dataclasses

from kernels import BACKENDS as ATTENTION_BACKENDS   # one list of backends for both

# The fields that fix the shapes of the weights and of the streaming state. A state or a
# checkpoint is compatible with a model exactly when these agree.
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "mlp_internal_dim_multiplier", "vocab_size")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"BDHConfig.{name}: expected an int >= {minimum}, "
                        f"got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"BDHConfig.{name}: expected an int >= {minimum}, got {value}")


@dataclasses.dataclass
class BDHConfig:
    """Sizes of a BDH model. Defaults are the official ones (25.3M parameters).

    N = mlp_internal_dim_multiplier · n_embd / n_head neurons per head (8192 by default).
    backend / chunk_size pick the Hebbian attention kernel (see `kernels.hebbian_attention`).
    "auto" is BDH's own policy: on CUDA the dense cuBLAS form for pieces of at most
    `dense_max_tokens` tokens (training at T = 512: the chunked kernel must pass B·H per-chunk
    states of K·V each, 537 MB per chunk at B32, and measured slower and 1.8× the memory), the
    Triton chunked kernel for longer pieces, `hebbian_step` for single tokens; on the CPU the
    chunked PyTorch path.
    recompute_attention (training only): save xs and recompute RoPE + attention in the backward
    instead of keeping the rotated copy (one [B,nh,T,N] tensor per layer less). The fused
    "dense" training path (`kernels.rope.qk_dense`) always does this, so there it changes nothing.
    gradient_checkpointing recomputes each whole layer in the backward pass (training only).
    """
    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256
    backend: str = "auto"
    chunk_size: int | None = None
    gradient_checkpointing: bool = False
    recompute_attention: bool = False
    dense_max_tokens: int = 1024

    def __post_init__(self):
        _check_int("n_layer", self.n_layer, 1)
        _check_int("n_embd", self.n_embd, 1)
        _check_int("n_head", self.n_head, 1)
        _check_int("mlp_internal_dim_multiplier", self.mlp_internal_dim_multiplier, 1)
        _check_int("vocab_size", self.vocab_size, 1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"BDHConfig.dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BDHConfig.dropout: expected a float in [0, 1), got {self.dropout}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"BDHConfig.backend: expected one of {ATTENTION_BACKENDS}, "
                             f"got {self.backend!r}")
        if self.chunk_size is not None:
            _check_int("chunk_size", self.chunk_size, 16)
            if self.chunk_size & (self.chunk_size - 1):
                raise ValueError(f"BDHConfig.chunk_size: expected None or a power of two >= 16, "
                                 f"got {self.chunk_size}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise TypeError(f"BDHConfig.gradient_checkpointing: expected a bool, "
                            f"got {self.gradient_checkpointing!r}")
        if not isinstance(self.recompute_attention, bool):
            raise TypeError(f"BDHConfig.recompute_attention: expected a bool, "
                            f"got {self.recompute_attention!r}")
        _check_int("dense_max_tokens", self.dense_max_tokens, 0)
        total = self.mlp_internal_dim_multiplier * self.n_embd
        if total % self.n_head:
            raise ValueError(f"BDHConfig: mlp_internal_dim_multiplier * n_embd = {total} must be "
                             f"divisible by n_head = {self.n_head}")
        if self.N % 2:
            raise ValueError(f"BDHConfig: RoPE rotates neuron pairs, so N = "
                             f"mlp_internal_dim_multiplier * n_embd // n_head must be even, "
                             f"got N = {self.N}")

    @property
    def N(self) -> int:
        """Neurons per head."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    def shape_dict(self) -> dict:
        """The fields that fix weight and state shapes (recorded in saved states)."""
        return {f: getattr(self, f) for f in SHAPE_FIELDS}

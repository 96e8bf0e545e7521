"""Checks of what the models take (token ids, a mixer's input sequence, integer arguments) and
the one loss of every language model here. Each error names the argument, the value received and
what was expected."""
from __future__ import annotations

import numbers

import torch


def check_int(name: str, value, minimum: int) -> int:
    """An int >= minimum (numpy integers too, never a bool); returns it as an int. TypeError for
    another type, ValueError for a smaller value; both name ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, "
                        f"got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value, minimum: int) -> int | None:
    """None, or an int >= minimum (as `check_int`)."""
    return None if value is None else check_int(name, value, minimum)


def check_sequence(x, d_model: int) -> None:
    """An attention module's input: a floating tensor x [B,T,D] with D = d_model and T >= 1."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor [B,T,D], got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x: expected shape [B,T,D] with D = {d_model}, got {list(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x: expected at least one token (T >= 1), got T = 0")


def next_token_loss(logits: torch.Tensor, targets) -> torch.Tensor:
    """Mean cross-entropy of logits [B,T,vocab] against targets [B,T] (token ids), in float32;
    the one loss of every language model here. A targets tensor of another shape raises."""
    B, T = logits.shape[:2]
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (B, T):
        raise ValueError(f"targets: expected a tensor of shape [B,T] = [{B}, {T}], "
                         f"got {getattr(targets, 'shape', type(targets).__name__)}")
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                             targets.reshape(-1))


def check_token_ids(idx, vocab_size: int, name: str = "idx") -> torch.Tensor:
    """Validate a [B,T] tensor of token ids (int64 or int32, in [0, vocab)); returns int64."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids [B,T], "
                        f"got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected token ids of dtype torch.long (int64), got {idx.dtype}")
    if idx.dim() != 2:
        raise ValueError(f"{name}: expected 2 dims [B,T], got shape {list(idx.shape)}")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"{name}: expected B >= 1 and T >= 1, got shape {list(idx.shape)}")
    if torch.compiler.is_compiling():
        return idx.long()     # the range check syncs with the device: eager calls only
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size={vocab_size}), "
                         f"got values in [{lo}, {hi}]")
    return idx.long()

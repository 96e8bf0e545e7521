"""Argument checks shared by every op family: each error names the argument, the value received
and what was expected."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, "
                        f"float64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {layout}, got shape {_shape(t)}")


def check_same_device(**tensors) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {n: t.device for n, t in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def resolve_backend(backend: str, device: torch.device, allowed: tuple) -> str:
    """The backend a call runs: "auto" is Triton on CUDA and the PyTorch path ("torch") on the
    CPU; "triton" on the CPU needs TRITON_INTERPRET=1 (set before import: how CI runs it)."""
    if backend not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend: 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         f"import to run on the CPU; got tensors on {device}")
    return backend


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


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b view the same memory with the same layout and dtype (q is k in BDH; one input
    passed as query, key and value): one read may serve both."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)

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


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b view the same memory with the same layout and dtype (q is k in BDH; one input
    passed as query, key and value): one read may serve both."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


LAYOUTS = ("bhtk", "bthk")      # [B, H, T, dim] (heads first, the kernels' order) or [B, T, H, dim]


def check_layout(layout) -> bool:
    """Whether ``layout`` is token-major ("bthk"); "bhtk" is the other layout taken."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout == "bthk"


def check_decode_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """One decoded token's q [B,H,K], k [B,Hk,K], v [B,Hk,V] with Hk dividing H (grouped
    key/value heads); returns (B, H, Hk, K, V)."""
    check_tensor("q", q, 3, "[B,H,K]")
    check_tensor("k", k, 3, "[B,Hk,K]")
    check_tensor("v", v, 3, "[B,Hk,V]")
    B, H, K = q.shape
    Hk, V = k.shape[1], v.shape[2]
    if k.shape[0] != B or k.shape[2] != K or Hk == 0 or H % Hk:
        raise ValueError(f"k: expected [B,Hk,K] with B = {B}, K = {K} and Hk dividing H = {H}, "
                         f"got {list(k.shape)}")
    if list(v.shape[:2]) != [B, Hk]:
        raise ValueError(f"v: expected [B,Hk,V] = [{B}, {Hk}, V], got {list(v.shape)}")
    return B, H, Hk, K, V

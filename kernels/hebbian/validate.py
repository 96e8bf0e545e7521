"""Input checks for the Hebbian attention entry points.

Every error names the argument, the value received and what was expected, so a caller sees
"k: expected shape [B,H,T,K] = [2, 4, 128, 64], got [2, 4, 128, 32]" instead of an index error
three frames deep in a kernel.
"""
from __future__ import annotations

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


def check_decay(decay, H: int, device) -> None:
    if decay is None:
        return
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay: expected None or a float tensor of shape [H] = [{H}], "
                        f"got {type(decay).__name__}")
    if not decay.is_floating_point():
        raise TypeError(f"decay: expected a floating dtype, got {decay.dtype}")
    if _shape(decay) != [H]:
        raise ValueError(f"decay: expected shape [H] = [{H}], got {_shape(decay)}")
    if decay.device != device:
        raise ValueError(f"decay: expected device {device}, got {decay.device}")
    # Checked on the host only for small tensors (always [H]); a sync is cheap next to a kernel.
    if not bool(((decay > 0) & (decay <= 1)).all()):
        raise ValueError(f"decay: every entry must lie in (0, 1], got {decay.tolist()}")


def check_state(name: str, state, B: int, H: int, K: int, V: int, device) -> None:
    if state is None:
        return
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor [B,H,K,V] = [{B}, {H}, {K}, {V}], "
                        f"got {type(state).__name__}")
    if state.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32 (the state is kept in float32), "
                        f"got {state.dtype}")
    if _shape(state) != [B, H, K, V]:
        raise ValueError(f"{name}: expected shape [B,H,K,V] = [{B}, {H}, {K}, {V}], "
                         f"got {_shape(state)}")
    if state.device != device:
        raise ValueError(f"{name}: expected device {device}, got {state.device}")


def check_attention_inputs(q, k, v, decay, initial_state, chunk_size) -> tuple[int, ...]:
    """Validate `hebbian_attention` inputs; returns (B, H, T, K, V)."""
    check_tensor("q", q, 4, "[B,H,T,K]")
    check_tensor("k", k, 4, "[B,H,T,K]")
    check_tensor("v", v, 4, "[B,H,T,V] or [B,1,T,V]")
    B, H, T, K = q.shape
    if _shape(k) != _shape(q):
        raise ValueError(f"k: expected shape [B,H,T,K] = {_shape(q)} (same as q), "
                         f"got {_shape(k)}")
    if v.shape[0] != B or v.shape[1] not in (1, H) or v.shape[2] != T:
        raise ValueError(f"v: expected shape [B,H,T,V] = [{B}, {H}, {T}, V] or "
                         f"[B,1,T,V] = [{B}, 1, {T}, V], got {_shape(v)}")
    V = v.shape[3]
    if K == 0:
        raise ValueError(f"q, k: the key dimension K must be >= 1, got shape {_shape(q)}")
    if V == 0:
        raise ValueError(f"v: the value dimension V must be >= 1, got shape {_shape(v)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} (same as q), got {k.dtype}")
    check_same_device(q=q, k=k, v=v, decay=decay, initial_state=initial_state)
    check_decay(decay, H, q.device)
    check_state("initial_state", initial_state, B, H, K, V, q.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 16
                                   or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size: expected None or a power of two >= 16, got {chunk_size!r}")
    return B, H, T, K, V


def check_step_inputs(q, k, v, state, decay) -> tuple[int, ...]:
    """Validate `hebbian_step` inputs; returns (B, H, K, V)."""
    check_tensor("q", q, 3, "[B,H,K]")
    check_tensor("k", k, 3, "[B,H,K]")
    check_tensor("v", v, 3, "[B,H,V] or [B,1,V]")
    B, H, K = q.shape
    if _shape(k) != _shape(q):
        raise ValueError(f"k: expected shape [B,H,K] = {_shape(q)} (same as q), got {_shape(k)}")
    if v.shape[0] != B or v.shape[1] not in (1, H):
        raise ValueError(f"v: expected shape [B,H,V] = [{B}, {H}, V] or [B,1,V], "
                         f"got {_shape(v)}")
    V = v.shape[2]
    if K == 0 or V == 0:
        raise ValueError(f"q/v: K and V must be >= 1, got K={K}, V={V}")
    if state is None:
        raise ValueError("state: hebbian_step needs the running state [B,H,K,V] float32, got None")
    check_same_device(q=q, k=k, v=v, state=state, decay=decay)
    check_state("state", state, B, H, K, V, q.device)
    check_decay(decay, H, q.device)
    return B, H, K, V

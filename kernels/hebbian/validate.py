"""Input checks for the Hebbian attention entry points.

Every error names the argument, the value received and what was expected, so a caller sees
"k: expected shape [B,H,T,K] = [2, 4, 128, 64], got [2, 4, 128, 32]" instead of an index error
three frames deep in a kernel.
"""
from __future__ import annotations

import math

import torch

from ..checks import _shape, check_layout, check_same_device, check_tensor
from ..varlen import checked_offsets

# The chunk cap: a [BT, BT] score tile and [BT, BV] accumulators sit in registers.
MAX_CHUNK = 128


def check_decay(decay, H: int) -> None:
    if decay is None:
        return
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay: expected None or a float tensor of shape [H] = [{H}], "
                        f"got {type(decay).__name__}")
    if not decay.is_floating_point():
        raise TypeError(f"decay: expected a floating dtype, got {decay.dtype}")
    if _shape(decay) != [H]:
        raise ValueError(f"decay: expected shape [H] = [{H}], got {_shape(decay)}")
    # Checked after the cast to float32, the precision the kernels use (a float64 decay of
    # 1e-50 is in range but underflows to 0 there, and log2(0) would poison every output).
    # Checked on the host: decay is always [H], and a sync is cheap next to a kernel.
    d32 = decay.detach().float()
    if not bool(((d32 > 0) & (d32 <= 1)).all()):
        raise ValueError(f"decay: every entry must lie in (0, 1] in float32 (the kernels' "
                         f"precision), got {decay.tolist()}")


def check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")


def check_state(name: str, state, B: int, H: int, K: int, V: int, rows: str = "B") -> None:
    """None or a float32 tensor [rows, H, K, V]; ``rows`` names the first dimension in messages
    (B, or N for the sequences of a varlen call)."""
    if state is None:
        return
    want = f"[{rows},H,K,V] = [{B}, {H}, {K}, {V}]"
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 tensor {want}, got {type(state).__name__}")
    if state.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32 (the state is kept in float32), "
                        f"got {state.dtype}")
    if _shape(state) != [B, H, K, V]:
        raise ValueError(f"{name}: expected shape {want}, got {_shape(state)}")


def _dims(layout: str, B, H, T, D: str, heads: str = "H") -> str:
    """A shape in the layout's order, e.g. "[B,T,H,V] = [2, 5, 3, V]"."""
    if layout == "bthk":
        return f"[B,T,{heads},{D}] = [{B}, {T}, {H}, {D}]"
    return f"[B,{heads},T,{D}] = [{B}, {H}, {T}, {D}]"


def check_attention_inputs(q, k, v, decay, initial_state, chunk_size, scale=1.0
                           ) -> tuple[int, ...]:
    """Validate dense [B,H,T,·] `hebbian_attention` inputs; returns (B, H, T, K, V)."""
    return check_attention_call(q, k, v, decay, initial_state, chunk_size, scale)[0]


def check_attention_call(q, k, v, decay, initial_state, chunk_size, scale=1.0, *,
                         layout="bhtk", cu_seqlens=None) -> tuple:
    """Validate `hebbian_attention` inputs; returns ((B, H, T, K, V), offsets): offsets are
    cu_seqlens read on the host (N + 1 ints), or None without cu_seqlens."""
    bthk = check_layout(layout)
    names = "[B,T,H,K]" if bthk else "[B,H,T,K]"
    check_tensor("q", q, 4, names)
    check_tensor("k", k, 4, names)
    check_tensor("v", v, 4, f"{names[:-2]}V] or " + ("[B,T,1,V]" if bthk else "[B,1,T,V]"))
    B, H, T, K = (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) if bthk else q.shape
    HV, TV = (v.shape[2], v.shape[1]) if bthk else (v.shape[1], v.shape[2])
    if _shape(k) != _shape(q):
        raise ValueError(f"k: expected shape {names} = {_shape(q)} (same as q), "
                         f"got {_shape(k)}")
    if v.shape[0] != B or HV not in (1, H) or TV != T:
        raise ValueError(f"v: expected shape {_dims(layout, B, H, T, 'V')} or "
                         f"{_dims(layout, B, 1, T, 'V', heads='1')}, got {_shape(v)}")
    V = v.shape[3]
    if K == 0:
        raise ValueError(f"q, k: the key dimension K must be >= 1, got shape {_shape(q)}")
    if V == 0:
        raise ValueError(f"v: the value dimension V must be >= 1, got shape {_shape(v)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: expected dtype {q.dtype} (same as q), got {k.dtype}")
    # Types and shapes first, devices after: a wrong type must not fail on `.device`.
    check_decay(decay, H)
    offsets = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens: the sequences are packed along time into one row, "
                             f"so q, k, v must have batch size 1, got q of shape {_shape(q)}")
        offsets = checked_offsets(cu_seqlens, T, q.device)
    rows = B if offsets is None else len(offsets) - 1
    check_state("initial_state", initial_state, rows, H, K, V, "B" if offsets is None else "N")
    check_scale(scale)
    check_same_device(q=q, k=k, v=v, decay=decay, initial_state=initial_state)
    check_chunk_size(chunk_size)
    return (B, H, T, K, V), offsets


def check_chunk_size(chunk_size, name: str = "chunk_size") -> None:
    """None (the kernels' default) or a power of two in [16, MAX_CHUNK]."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or not 16 <= chunk_size <= MAX_CHUNK
                                   or chunk_size & (chunk_size - 1)):
        raise ValueError(f"{name}: expected None or a power of two in [16, {MAX_CHUNK}] "
                         f"(the kernels hold a chunk's scores in registers), got {chunk_size!r}")


def check_step_inputs(q, k, v, state, decay, scale=1.0) -> tuple[int, ...]:
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
    check_state("state", state, B, H, K, V)
    check_decay(decay, H)
    check_scale(scale)
    check_same_device(q=q, k=k, v=v, state=state, decay=decay)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, state, decay)):
        raise ValueError("hebbian_step is a decoding step and is not differentiable (it updates "
                         "the state in place); call it under torch.no_grad(), or use "
                         "hebbian_attention for a differentiable step")
    return B, H, K, V

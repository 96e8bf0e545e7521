"""Public entry points of the delta rule: `delta_rule` (training / prefill) and
`delta_rule_step` (decoding).

Backends:
  "auto"      fla's `chunk_delta_rule` for 16-bit CUDA inputs when fla is importable, else
              "torch" (fla 0.6 refuses float32 inputs).
  "fla"       flash-linear-attention's Triton kernel (a peer library; CUDA, fp16/bf16 only).
  "torch"     our chunked WY / UT-transform form (`chunk.py`).
  "reference" the token-by-token recurrence (`naive.py`; slow, the oracle).
"""
from __future__ import annotations

import importlib.util

import torch

from .chunk import chunk_delta_rule_torch
from .naive import delta_rule_recurrent, delta_rule_step_naive

BACKENDS = ("auto", "fla", "torch", "reference")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def _check(name, t, shape, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if list(t.shape) != list(shape):
        raise ValueError(f"{name}: expected shape {layout} = {list(shape)}, got {list(t.shape)}")


def check_delta_inputs(q, k, v, beta, initial_state, chunk_size=None):
    """Validate `delta_rule` inputs; returns (B, H, T, K, V)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor [B,H,T,K], got "
                         f"{list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    B, H, T, K = q.shape
    _check("q", q, q.shape, "[B,H,T,K]")
    _check("k", k, (B, H, T, K), "[B,H,T,K]")
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        raise ValueError(f"v: expected a 4-D tensor [B,H,T,V], got "
                         f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    V = v.shape[-1]
    _check("v", v, (B, H, T, V), "[B,H,T,V]")
    _check("beta", beta, (B, H, T), "[B,H,T]")
    if K == 0 or V == 0:
        raise ValueError(f"q/v: K and V must be >= 1, got K={K}, V={V}")
    if initial_state is not None:
        _check("initial_state", initial_state, (B, H, K, V), "[B,H,K,V]")
    devices = {t.device for t in (q, k, v, beta, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
    return B, H, T, K, V


def delta_rule(q, k, v, beta, *, scale=1.0, initial_state=None, output_final_state=False,
               chunk_size=None, backend="auto"):
    """Causal delta-rule attention (see `naive.py` for the math; keys should be L2-normalised).

    q, k [B,H,T,K]; v [B,H,T,V]; beta [B,H,T] in (0, 1); initial_state None or [B,H,K,V].
    Returns (o [B,H,T,V] in v's dtype, S_final [B,H,K,V] float32 (float64 for float64 inputs)
    or None). Differentiable in q, k, v, beta and initial_state.
    """
    check_delta_inputs(q, k, v, beta, initial_state, chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "fla" if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                             and fla_available()) else "torch"
    if backend == "fla":
        o, S = _fla_chunk(q, k, v, beta, scale, initial_state, output_final_state)
    elif backend == "torch":
        o, S = chunk_delta_rule_torch(q, k, v, beta, scale=scale, initial_state=initial_state,
                                      chunk_size=chunk_size or 64)
    else:
        o, S = delta_rule_recurrent(q, k, v, beta, scale=scale, initial_state=initial_state)
    return o, (S if output_final_state else None)


def _fla_chunk(q, k, v, beta, scale, initial_state, output_final_state):
    """fla's kernel takes [B,T,H,*] tensors and a float32 state."""
    if not q.is_cuda:
        raise ValueError(f"backend: 'fla' needs CUDA tensors, got {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend: 'fla' takes float16 or bfloat16 inputs, got {q.dtype}; use "
                         "'torch' or 'auto'")
    from fla.ops.delta_rule import chunk_delta_rule
    t = lambda x: x.transpose(1, 2)                                     # noqa: E731
    h0 = None if initial_state is None else initial_state.float()
    o, S = chunk_delta_rule(t(q), t(k), t(v.to(q.dtype)), beta.transpose(1, 2).to(q.dtype),
                            scale=scale, initial_state=h0, output_final_state=output_final_state)
    return t(o).to(v.dtype), (None if S is None else S.float())


def delta_rule_step(q, k, v, beta, state, *, scale=1.0):
    """One decoding step: q, k [B,H,K]; v [B,H,V]; beta [B,H]; state [B,H,K,V].
    Returns (o [B,H,V] in v's dtype, new state); the given state is left unchanged."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor [B,H,K], got "
                         f"{list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    B, H, K = q.shape
    _check("k", k, (B, H, K), "[B,H,K]")
    if not isinstance(v, torch.Tensor) or v.dim() != 3:
        raise ValueError(f"v: expected a 3-D tensor [B,H,V], got "
                         f"{list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    V = v.shape[-1]
    _check("v", v, (B, H, V), "[B,H,V]")
    _check("beta", beta, (B, H), "[B,H]")
    if state is None:
        raise ValueError("state: delta_rule_step needs the running state [B,H,K,V], got None")
    _check("state", state, (B, H, K, V), "[B,H,K,V]")
    return delta_rule_step_naive(q, k, v, beta, state, scale=scale)

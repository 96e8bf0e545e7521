"""One decoded token of normalised linear attention (`normalised.py`) in one kernel launch.

    S' ← S' + φ(k)ᵀ [v | 1]          (in place: S' [B,H,K,V+1] float32, the normaliser last)
    o  = φ(q) S'[:, :V] / (φ(q)·S'[:, V] + eps)

`normalised_hebbian_attention` runs a decoded token as five to ten launches (the feature maps,
the ones column, the step and its reduction, the division, casts). Here one program per
(batch row, head) loads q, k, v straight from the model's strided views (no copies), updates
its head's S' and writes o, so a decode step of a model layer is one launch: what a CUDA graph
replays cheaply. Grouped key/value heads (GQA) are read in place: query head h uses key/value
head h // (H / Hk).

A key of -inf has φ(k) = 0 under both feature maps (elu(-inf) + 1 = 0, relu(-inf) = 0): the
token leaves S' unchanged. Callers mask padded tokens that way.

`normalised_step_torch` is the readable form (the CPU path and the tests' oracle);
normalised_step_triton.py the kernel (imported on first use: importing kernels loads no Triton).
"""
from __future__ import annotations

import torch

from ..checks import check_decode_qkv, check_same_device, resolve_backend
from .api import BACKENDS
from .normalised import check_normalised_options, feature


def check_normalised_step(q, k, v, state, out) -> tuple[int, int, int, int, int]:
    """Validate `normalised_hebbian_step` inputs; returns (B, H, Hk, K, V)."""
    B, H, Hk, K, V = check_decode_qkv(q, k, v)
    want = [B, H, K, V + 1]
    if not isinstance(state, torch.Tensor) or state.dtype != torch.float32 \
            or list(state.shape) != want or not state.is_contiguous():
        raise ValueError(f"state: expected a contiguous float32 tensor {want} (updated in "
                         f"place), got {getattr(state, 'dtype', type(state).__name__)} "
                         f"{list(getattr(state, 'shape', []))}")
    if out is not None and (not isinstance(out, torch.Tensor) or list(out.shape) != [B, H, V]
                            or out.dtype != v.dtype or out.stride(-1) != 1):
        raise ValueError(f"out: expected None or a [B,H,V] = [{B}, {H}, {V}] tensor of v's "
                         f"dtype {v.dtype} with unit last stride, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} "
                         f"{list(getattr(out, 'shape', []))}")
    check_same_device(q=q, k=k, v=v, state=state, out=out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state)):
        raise ValueError("normalised_hebbian_step updates the state in place and is not "
                         "differentiable; call it under torch.no_grad()")
    return B, H, Hk, K, V


def normalised_step_torch(q, k, v, state, *, feature_map="elu", eps=1e-6):
    """The readable step: S' updated in place, o [B,H,V] in v's dtype."""
    B, H, K = q.shape
    G = H // k.shape[1]
    fq, fk = feature(q.float(), feature_map), feature(k.float(), feature_map)
    v1 = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], -1)
    fk, v1 = fk.repeat_interleave(G, 1), v1.repeat_interleave(G, 1)
    state.add_(fk[..., :, None] * v1[..., None, :])
    o1 = torch.einsum("bhk,bhkv->bhv", fq, state)
    return (o1[..., :-1] / (o1[..., -1:] + eps)).to(v.dtype)


def normalised_hebbian_step(q, k, v, state, *, feature_map="elu", eps=1e-6, backend="auto",
                            out=None):
    """One decoded token: q [B,H,K], k [B,Hk,K], v [B,Hk,V] (Hk divides H; any strides with a
    unit last one), S' [B,H,K,V+1] float32 contiguous, updated in place. Writes o [B,H,V] in
    v's dtype into ``out`` (a [B,H,V] view of the caller's buffer, e.g. the [B,1,H,V] attention
    output) or a new tensor, and returns it. Not differentiable. backend: a kernels.hebbian
    backend ("auto": Triton on CUDA, the PyTorch form on the CPU)."""
    check_normalised_options(feature_map, eps, None, backend)
    check_normalised_step(q, k, v, state, out)
    kind = resolve_backend(backend, q.device, BACKENDS)
    if kind != "triton":
        o = normalised_step_torch(q, k, v, state, feature_map=feature_map, eps=eps)
        return o if out is None else out.copy_(o)
    from .normalised_step_triton import normalised_step_triton
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=q.device)
    return normalised_step_triton(q, k, v, state, out, feature_map=feature_map, eps=eps)


__all__ = ["normalised_hebbian_step", "normalised_step_torch", "check_normalised_step"]

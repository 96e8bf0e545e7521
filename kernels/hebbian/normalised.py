"""Normalised linear attention (Katharopoulos et al., "Transformers are RNNs") on the Hebbian
kernels: inclusive (a token sees itself), with a positive feature map φ.

    S_t = Σ_{s≤t} φ(k_s)ᵀ v_s      z_t = Σ_{s≤t} φ(k_s)
    o_t = φ(q_t) S_t / (φ(q_t)·z_t + eps)

The normaliser z rides in the same kernel call as an extra ones-column of v: with v' = [v, 1]
the inclusive Hebbian state S' = Σ φ(k)ᵀ v' is [S | z], and φ(q) S' = [numerator |
denominator].
So a sequence is one `hebbian_attention(..., strict=False)` call (chunked) and a decoded token
one `hebbian_step`; the state is S' [B,H,K,V+1] float32, whatever the context length.

φ: "elu" is elu(x) + 1 (always positive, so the denominator never vanishes and gradients flow
for every sign of x); "relu" is relu(x).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .api import BACKENDS, hebbian_attention, hebbian_step
from .validate import check_chunk_size

FEATURE_MAPS = ("elu", "relu")


def check_normalised_options(feature_map="elu", eps=1e-6, chunk_size=None, backend="auto", *,
                             prefix: str = "") -> None:
    """Raise ValueError / TypeError naming ``prefix`` + the option unless every option is one
    `normalised_hebbian_attention` takes (a caller validates before any work with this)."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"{prefix}feature_map: expected one of {FEATURE_MAPS}, "
                         f"got {feature_map!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{prefix}eps: expected a finite number > 0, "
                        f"got {type(eps).__name__} {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{prefix}eps: expected a finite number > 0, got {eps!r}")
    check_chunk_size(chunk_size, f"{prefix}chunk_size")
    if backend not in BACKENDS:
        raise ValueError(f"{prefix}backend: expected one of {BACKENDS}, got {backend!r}")


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(x): elu(x) + 1 or relu(x)."""
    return F.elu(x) + 1.0 if feature_map == "elu" else F.relu(x)


def normalised_hebbian_attention(q, k, v, state=None, *, feature_map="elu", eps=1e-6,
                                 chunk_size=None, backend="auto", output_final_state=False,
                                 inplace=False):
    """Normalised linear attention of q, k [B,H,T,K] (one dtype), v [B,H,T,V], after ``state``
    (None, or S' [B,H,K,V+1] float32 with the normaliser in its last column).

    Returns (o [B,H,T,V] in v's dtype, S' after these tokens or None). One token with a state
    and autograd off runs the step kernel. ``inplace``: write the new state into ``state``
    itself and return it (a cache that owns a fixed buffer); otherwise ``state`` is left as it
    was. The division runs in float32 at least (the denominator sums the whole context).
    """
    check_normalised_options(feature_map, eps, chunk_size, backend)
    fq, fk = feature(q, feature_map), feature(k, feature_map)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)             # [v | 1]
    if state is not None and q.shape[2] == 1 and not torch.is_grad_enabled():
        S = state if inplace else state.clone()                  # the step updates in place
        o1, S = hebbian_step(fq[:, :, 0], fk[:, :, 0], v1[:, :, 0], S, strict=False,
                             backend=backend)
        o1 = o1.unsqueeze(2)
    else:
        o1, S = hebbian_attention(fq, fk, v1, strict=False, initial_state=state,
                                  output_final_state=output_final_state or inplace,
                                  chunk_size=chunk_size, backend=backend)
        if inplace and state is not None:
            S = state.copy_(S)
    if o1.dtype in (torch.float16, torch.bfloat16):
        o1 = o1.float()
    o = o1[..., :-1] / (o1[..., -1:] + eps)
    return o.to(v.dtype), (S if output_final_state or inplace else None)


__all__ = ["FEATURE_MAPS", "check_normalised_options", "feature",
           "normalised_hebbian_attention"]

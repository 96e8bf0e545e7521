"""BDH's training-time attention in one autograd Function: RoPE + dense strict Hebbian attention
with q = k, for short pieces (T ≲ 1k) with no state in or out.

    Q = RoPE(xs)                         [.., T, N]   (one tensor serves as q and k)
    P = tril₋₁(Q Qᵀ)                     [.., T, T]   strict: t sees s < t
    a = P v                              [.., T, D]   v shared by the heads (broadcast)

It computes what `kernels.hebbian_attention(Q, Q, v, strict=True, backend="dense")` computes
(the readable reference, used by the tests), but is cheaper because it knows q = k:

  * memory: it saves xs (which the layer keeps anyway for xy = xs·ys), v and the small score
    matrix P (T² per row), never Q: Q is recomputed by one RoPE pass in the backward. At the
    official preset (B32 T512 nh4 N8192, bf16) that is 1 GiB less per layer, 6 GiB per step.
  * FLOPs: dL/dQ = (G + Gᵀ) Q with G = tril₋₁(dO vᵀ), one [T,T]×[T,N] product instead of the
    two (dq = G k, dk = Gᵀ q) autograd runs: −2·T²·N per row, 550 GFLOP per layer at the
    preset (of ≈ 4.2 TFLOP per layer forward + backward).
  * traffic: the inverse rotation of dL/dQ runs in place; dq + dk is never materialised.

Rows: xs may be [B,nh,T,N] contiguous or the transposed view of a contiguous [nh,B,T,N]
tensor (BDH's head-major layout); both are used without a copy. v is [B,1,T,D].
"""
from __future__ import annotations

import torch

from .rotate import _rotate_any


def _canonical(xs: torch.Tensor, v: torch.Tensor):
    """(xs4 contiguous, v4 broadcastable to it, head dim) without copying xs."""
    xt = xs.transpose(0, 1)
    if xt.is_contiguous() and not xs.is_contiguous():
        return xt, v.transpose(0, 1), 0                # [nh,B,T,N], v [1,B,T,D]
    return xs.contiguous(), v, 1                      # [B,nh,T,N], v [B,1,T,D]


class _RopeDenseAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, xs4, v4, start, hdim, cd):
        # Every product runs in ``cd`` (the autocast dtype under autocast, else xs's dtype), in
        # the forward and the backward alike, so a float32 xs under bf16 autocast never meets a
        # bf16 score matrix in one matmul.
        vc = v4.to(cd)
        q = _rotate_any(xs4.to(cd), start, inverse=False)
        P = torch.matmul(q, q.transpose(-1, -2)).tril_(-1)      # [G1,G2,T,T]
        del q
        o = torch.matmul(P, vc)                                  # v broadcasts over the heads
        ctx.save_for_backward(xs4, vc, P)
        ctx.start, ctx.hdim, ctx.v_dtype = start, hdim, v4.dtype
        return o.to(v4.dtype)

    @staticmethod
    def backward(ctx, do):
        xs4, vc, P = ctx.saved_tensors
        do = do.to(vc.dtype)
        dv = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(vc.dtype, torch.float32)     # the head sum in ≥ fp32
            dv = torch.matmul(P.transpose(-1, -2), do).sum(ctx.hdim, keepdim=True, dtype=acc)
            dv = dv.to(ctx.v_dtype)
        dxs = None
        if ctx.needs_input_grad[0]:
            G = torch.matmul(do, vc.transpose(-1, -2)).tril_(-1)   # dL/d(QQᵀ) on the mask
            G = G + G.transpose(-1, -2)
            q = _rotate_any(xs4.to(vc.dtype), ctx.start, inverse=False)
            dq = torch.matmul(G, q)                                # dL/dQ (q and k together)
            del q, G
            dxs = _rotate_any(dq, ctx.start, inverse=True, inplace=True)   # Rᵀ: the inverse
            dxs = dxs.to(xs4.dtype)
        return dxs, dv, None, None, None


def rope_dense_attention(xs: torch.Tensor, v: torch.Tensor, start: int = 0) -> torch.Tensor:
    """a [B,nh,T,D] (in v's dtype) = tril₋₁(RoPE(xs) RoPE(xs)ᵀ) v for xs [B,nh,T,N], v
    [B,1,T,D], RoPE from position ``start``. Differentiable in xs and v. The result has the
    layout of xs (a view of [nh,B,T,D] when xs is head-major)."""
    xs4, v4, hdim = _canonical(xs, v)
    o = _apply(xs4, v4, int(start), hdim)
    return o.transpose(0, 1) if hdim == 0 else o


@torch.compiler.disable
def _apply(xs4, v4, start, hdim):
    # Run eagerly under torch.compile: a graph break on each side of the attention (two
    # matmuls and Triton passes, nothing to fuse), instead of asking dynamo to trace a Triton
    # kernel inside an autograd Function's backward.
    dev = xs4.device.type
    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xs4.dtype
    with torch.autocast(dev, enabled=False):
        return _RopeDenseAttention.apply(xs4, v4, start, hdim, cd)

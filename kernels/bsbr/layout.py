"""The two layouts of per-token tensors (q, k, v, r, hk, the output and their gradients):

    "bhtk"   [B, H, T, dim]   head-major, the kernels' native order
    "bthk"   [B, T, H, dim]   token-major, what a model's projections give before any transpose

Inside kernels.bsbr every per-token tensor is a [B, H, T, dim] view; for "bthk" it is the
transpose of the caller's tensor (a view: no copy). The Triton kernels read and write that
memory where it lies (`token_rows`, the BTHK constexpr), so a "bthk" call copies nothing that
is already contiguous in its layout; a tensor that is not (a slice of a fused projection, an
expanded gradient) is copied once into its layout. Per-chunk tensors (states F, h, the bank)
are [B, H, n, ...] in both layouts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import LAYOUTS, check_layout  # noqa: F401  (re-exported: one definition)

def heads_first(x, bthk: bool):
    """The [B, H, T, dim] view of a caller's per-token tensor (None stays None)."""
    return x.transpose(1, 2) if bthk and x is not None else x


def to_caller(x, bthk: bool):
    """A [B, H, T, dim] result in the caller's layout, contiguous (no copy for a result the
    kernels wrote in that layout)."""
    return x.transpose(1, 2).contiguous() if bthk else x


def stored_as(x, bthk: bool):
    """x (a [B, H, T, dim] view) contiguous in its layout: itself when it already is, else one
    copy (still returned as a [B, H, T, dim] view)."""
    if not bthk:
        return x.contiguous()
    t = x.transpose(1, 2)
    return x if t.is_contiguous() else t.contiguous().transpose(1, 2)


def empty_as(B, H, T, D, bthk: bool, *, dtype, device):
    """An uninitialised [B, H, T, D] view stored in the layout."""
    if bthk:
        return torch.empty(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(B, H, T, D, dtype=dtype, device=device)


@triton.jit
def token_rows(x, bh, H, T, D: tl.constexpr, BTHK: tl.constexpr):
    """(pointer to token 0 of head bh = b·H + h, stride between tokens) of a per-token tensor
    [B, H, T, D] stored head-major, or token-major ([B, T, H, D]) when BTHK. bh is int64."""
    if BTHK:
        base = (bh // H) * T * H * D + (bh % H) * D
        stride = H * D
    else:
        base = bh * T * D
        stride = D
    return x + base, stride

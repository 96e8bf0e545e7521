"""RoPE as autograd Functions: the Triton pass on CUDA (`triton_rotate.py`), the reference
rotation (`naive.py`) elsewhere.

Memory: `rotate_neurons` saves nothing but the start position. The Triton pass reads x once and
writes the rotation once; its gradient is the inverse rotation (the transpose), recomputed from
the same exact phases, so neither cos/sin tables nor float32 copies of a bf16 input are kept.
"""
from __future__ import annotations

import torch

from .naive import pair_freqs64, rotate_reference


def _rotate_any(x: torch.Tensor, start, inverse: bool,
                inplace: bool = False) -> torch.Tensor:
    """The Triton pass on CUDA (one read, one write: `triton_rotate.py`), else the reference.
    ``start``: an int; a tuple of ints, one per row of x's first dimension; or an int64 tensor
    [1] or [x.shape[0]] on x's device that the kernel reads (elsewhere it is read back).
    ``inplace``: a contiguous CUDA x may be overwritten (saves an allocation); elsewhere a new
    tensor is returned all the same."""
    if x.is_cuda and x.dtype != torch.float64:
        from .triton_rotate import rope_rotate_triton
        if isinstance(start, tuple):
            start = torch.tensor(start, dtype=torch.int64, device=x.device)
        return rope_rotate_triton(x, start, inverse, pair_freqs64(x.shape[-1] // 2 * 2,
                                                                  x.device),
                                  inplace=inplace and x.is_contiguous())
    if isinstance(start, torch.Tensor):
        start = int(start) if start.numel() == 1 else tuple(start.tolist())
    return rotate_reference(x, start, inverse)


class _RotateNeurons(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start):
        ctx.start = start
        return _rotate_any(x, start, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        return _rotate_any(grad.contiguous(), ctx.start, inverse=True), None


def _check_even(x: torch.Tensor) -> None:
    if x.shape[-1] % 2:
        raise ValueError(f"x: RoPE needs an even last dimension N, got shape {list(x.shape)}")


def rotate_neurons(x: torch.Tensor, start=0) -> torch.Tensor:
    """RoPE of x [..., T, N] (N even) at positions start … start+T−1; differentiable in x.
    ``start``: an int, or a sequence of ints, one per row of x's first dimension (a batch of
    streams at different positions). Returns a new tensor in x's dtype."""
    _check_even(x)
    if not isinstance(start, (tuple, list)):
        return _RotateNeurons.apply(x, int(start))
    starts = tuple(int(s) for s in start)
    if x.dim() < 3 or len(starts) != x.shape[0]:
        raise ValueError(f"start: expected an int or one int per row of x's first dimension "
                         f"(x {list(x.shape)}), got {len(starts)} positions")
    return _RotateNeurons.apply(x, starts)


def rotate_at(x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., T, N] from start positions held in an int64 tensor on the device: [1]
    (every row) or [x.shape[0]] (one per row of the first dimension, so streams at different
    positions step together). Not differentiable: decoding only. On CUDA the Triton kernel
    reads the positions on the device, so a CUDA graph that captured this call rotates by the
    positions current at replay; elsewhere they are read back and the reference runs."""
    rows = x.shape[0] if x.dim() >= 3 else 1
    if not isinstance(position, torch.Tensor) or position.dtype != torch.int64 \
            or position.dim() > 1 or position.numel() not in (1, rows):
        raise TypeError(f"position: expected an int64 tensor [1] or [{rows}] (one position per "
                        f"row of x {list(x.shape)}), got "
                        f"{getattr(position, 'dtype', type(position).__name__)} "
                        f"{list(getattr(position, 'shape', []))}")
    _check_even(x)
    if x.is_cuda and position.device != x.device:
        raise ValueError(f"position: expected a tensor on {x.device}, got {position.device}")
    return _rotate_any(x, position.view(-1), inverse=False)

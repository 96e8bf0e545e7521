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
    ``start``: an int, or an int64 tensor [1] on x's device that the kernel reads (elsewhere it
    is read back). ``inplace``: a contiguous CUDA x may be overwritten (saves an allocation);
    elsewhere a new tensor is returned all the same."""
    if x.is_cuda and x.dtype != torch.float64:
        from .triton_rotate import rope_rotate_triton
        return rope_rotate_triton(x, start, inverse, pair_freqs64(x.shape[-1] // 2 * 2,
                                                                  x.device),
                                  inplace=inplace and x.is_contiguous())
    return rotate_reference(x, int(start), inverse)


class _RotateNeurons(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start):
        ctx.start = start
        return _rotate_any(x, start, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        return _rotate_any(grad.contiguous(), ctx.start, inverse=True), None


def rotate_neurons(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    """RoPE of x [..., T, N] (N even) at positions start … start+T−1; differentiable in x.
    Returns a new tensor in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"x: RoPE needs an even last dimension N, got shape {list(x.shape)}")
    return _RotateNeurons.apply(x, int(start))


def rotate_at(x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """RoPE of x [..., T, N] from a start position held in an int64 tensor [1] (not
    differentiable: decoding only). On CUDA the Triton kernel reads the position on the device,
    so a CUDA graph that captured this call rotates by the position current at replay; elsewhere
    the position is read back and the reference runs."""
    if not isinstance(position, torch.Tensor) or position.dtype != torch.int64 \
            or position.numel() != 1:
        raise TypeError(f"position: expected an int64 tensor with one element, got "
                        f"{getattr(position, 'dtype', type(position).__name__)} "
                        f"{list(getattr(position, 'shape', []))}")
    if x.shape[-1] % 2:
        raise ValueError(f"x: RoPE needs an even last dimension N, got shape {list(x.shape)}")
    if x.is_cuda and position.device != x.device:
        raise ValueError(f"position: expected a tensor on {x.device}, got {position.device}")
    return _rotate_any(x, position.view(1), inverse=False)

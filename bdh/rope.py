"""RoPE on the neuron axis, as in the official BDH, with phases that stay exact at any position.

Pairs of neurons (x_{2i}, x_{2i+1}) rotate by the angle 2π·frac(t·f_i) at absolute position t,

    x'_{2i}   = x_{2i} cos φ − x_{2i+1} sin φ
    x'_{2i+1} = x_{2i+1} cos φ + x_{2i} sin φ,        f_i = θ^{−2i/N} / 2π,  θ = 2^16

which is the official `v·cos + rot(v)·sin` with rot(x_{2i}, x_{2i+1}) = (−x_{2i+1}, x_{2i}).

Why not the official float32 `(t·f mod 1)·2π`: a float32 product t·f has an absolute error of
about t·f·2^-24 cycles, so past ~1e5 tokens the phase is off by 1e-3 rad and more (≈0.06 rad
at 1e6). Here t·f is formed in float64 from the exact f (t < 2^53 is exact, the product carries
~1e-16 relative error), reduced mod 1 in float64, and only the reduced angle in [0, 2π) is cast
to float32, so the angle is good to ~4e-7 rad at any position. At short positions it agrees
with the official phases to float32 rounding.

Memory: `rotate_neurons` is an autograd Function that saves nothing but the start position. It
works through the sequence in row blocks, builds the cos/sin table of each block on the fly
(float32, N/2 columns: the two members of a pair share one angle) and recomputes it in the
backward pass, so neither the tables nor float32 copies of a bf16 input are ever kept.
"""
from __future__ import annotations

import functools
import math

import torch

THETA = 2.0 ** 16
_BLOCK_ELEMS = 1 << 24   # elements of [.., rows, N/2] handled per block (64 MiB in float32)


def official_freqs(N: int, dtype=torch.float32) -> torch.Tensor:
    """The official `get_freqs(N, θ=2^16)` values [N] (the `attn.freqs` buffer), kept for
    state_dict compatibility. Phases are computed from `pair_freqs64`, not from these."""
    i = torch.arange(0, N, 1, dtype=dtype)
    return 1.0 / (THETA ** (torch.floor(i / 2) * 2 / N)) / (2 * math.pi)


@functools.lru_cache(maxsize=32)
def pair_freqs64(N: int, device: torch.device) -> torch.Tensor:
    """f_j = θ^{−2j/N} / 2π for the N/2 neuron pairs, in float64 (θ = 2^16, so θ^{−2j/N} =
    2^{−32j/N})."""
    j = torch.arange(N // 2, dtype=torch.float64, device=device)
    return torch.exp2(-32.0 * j / N) / (2 * math.pi)


def rope_angles(start: int, T: int, N: int, device=None) -> torch.Tensor:
    """Angles φ [T, N/2] in [0, 2π), float64, for positions start … start+T−1."""
    if start < 0 or start + T > 2 ** 53:
        raise ValueError(f"position: expected 0 <= start and start + T <= 2^53, "
                         f"got start={start}, T={T}")
    device = torch.device("cpu") if device is None else torch.device(device)
    t = torch.arange(T, dtype=torch.float64, device=device) + float(start)
    cycles = t[:, None] * pair_freqs64(N, device)[None, :]
    return (cycles - torch.floor(cycles)) * (2 * math.pi)


def rope_tables(start: int, T: int, N: int, device=None, dtype=torch.float32):
    """(cos φ, sin φ), each [T, N/2] in ``dtype`` (the angle is reduced before the cast)."""
    ang = rope_angles(start, T, N, device).to(dtype)
    return torch.cos(ang), torch.sin(ang)


def _rotate(x: torch.Tensor, start: int, inverse: bool) -> torch.Tensor:
    """Rotate x [..., T, N] by the angles of positions start…; inverse=True rotates by −φ (the
    transpose, used for the gradient)."""
    T, N = x.shape[-2], x.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xp = x.unflatten(-1, (N // 2, 2))
    op = out.unflatten(-1, (N // 2, 2))
    lead = max(1, x.numel() // max(1, T * N))
    rows = max(1, min(T, _BLOCK_ELEMS // max(1, lead * (N // 2))))
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        c, s = rope_tables(start + r0, r1 - r0, N, x.device, cd)
        if inverse:
            s = -s
        xe = xp[..., r0:r1, :, 0].to(cd)
        xo = xp[..., r0:r1, :, 1].to(cd)
        op[..., r0:r1, :, 0] = xe * c - xo * s
        op[..., r0:r1, :, 1] = xo * c + xe * s
    return out


def _rotate_any(x: torch.Tensor, start, inverse: bool,
                inplace: bool = False) -> torch.Tensor:
    """The Triton pass on CUDA (one read, one write: `bdh.rope_kernel`), else `_rotate`.
    ``start``: an int, or an int64 tensor [1] on x's device that the kernel reads (elsewhere it
    is read back). ``inplace``: a contiguous CUDA x may be overwritten (saves an allocation);
    elsewhere a new tensor is returned all the same."""
    if x.is_cuda and x.dtype != torch.float64:
        from .rope_kernel import rope_rotate_triton
        return rope_rotate_triton(x, start, inverse, pair_freqs64(x.shape[-1] // 2 * 2,
                                                                  x.device),
                                  inplace=inplace and x.is_contiguous())
    return _rotate(x, int(start), inverse)


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
    the position is read back and `_rotate` runs."""
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

"""RoPE on the neuron axis, the readable reference: exact phases and a PyTorch rotation.

Pairs of neurons (x_{2i}, x_{2i+1}) rotate by the angle 2π·frac(t·f_i) at absolute position t,

    x'_{2i}   = x_{2i} cos φ − x_{2i+1} sin φ
    x'_{2i+1} = x_{2i+1} cos φ + x_{2i} sin φ,        f_i = θ^{−2i/N} / 2π,  θ = 2^16

which is the official BDH `v·cos + rot(v)·sin` with rot(x_{2i}, x_{2i+1}) = (−x_{2i+1}, x_{2i}).

Why not the official float32 `(t·f mod 1)·2π`: a float32 product t·f has an absolute error of
about t·f·2^-24 cycles, so past ~1e5 tokens the phase is off by 1e-3 rad and more (≈0.06 rad
at 1e6). Here t·f is formed in float64 from the exact f (t < 2^53 is exact), reduced mod 1 in
float64, and only the reduced angle in [0, 2π) is cast to float32, so the angle is good to
~4e-7 rad at any position. `rotate_reference` is the oracle for the Triton pass
(`triton_rotate.py`) and the CPU path of `rotate.py`.
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


def rotate_reference(x: torch.Tensor, start, inverse: bool) -> torch.Tensor:
    """Rotate x [..., T, N] by the angles of positions start…; inverse=True rotates by −φ (the
    transpose, used for the gradient). ``start``: an int, or one int per row of x's first
    dimension (rows at different positions, as a batch of streams decoded together)."""
    if not isinstance(start, int):
        starts = [int(s) for s in start]
        if x.dim() < 3 or len(starts) != x.shape[0]:
            raise ValueError(f"start: expected one position per row of x's first dimension "
                             f"(x {list(x.shape)}), got {len(starts)}")
        if not starts:
            return x.clone()
        return torch.stack([rotate_reference(x[b], s, inverse) for b, s in enumerate(starts)])
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

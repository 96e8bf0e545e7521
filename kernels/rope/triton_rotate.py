"""RoPE on the neuron axis as one Triton pass: read x once, write the rotation once.

The readable reference is `kernels.rope.naive.rotate_reference` (PyTorch, row blocks); this
kernel computes the same function. Each program owns a block of BT positions × BP neuron
pairs: it forms the exact phases of that block once — t·f_j in float64 (t < 2^53 is exact),
reduced mod 1, then cast to float32 and scaled by 2π, so the angle is good to ~1e-6 rad at any
position — and reuses the cos/sin tile for every batch·head row that shares those positions.
No cos/sin table is materialised in memory and no float32 copy of a bf16 input is made.

inverse=True rotates by −φ: the transpose of the rotation, i.e. its gradient.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TWO_PI = 2 * math.pi


@triton.jit
def phase_angle(b_cyc):
    """The angle 2π·frac(c) of float64 cycle counts c = position·f, reduced mod 1 in float64
    before the cast to float32 (good to ~1e-6 rad at any position)."""
    return (b_cyc - b_cyc.to(tl.int64).to(tl.float64)).to(tl.float32) * 6.283185307179586


@triton.jit
def rotate_pairs(b_x, b_c, b_s, R: tl.constexpr, BP: tl.constexpr):
    """Float32 rows b_x [R, 2·BP] of neuron pairs (2j, 2j+1), each pair rotated by its angle
    (cos b_c, sin b_s, broadcastable to [R, BP])."""
    b_xe, b_xo = tl.split(tl.reshape(b_x, (R, BP, 2)))
    return tl.reshape(tl.join(b_xe * b_c - b_xo * b_s, b_xo * b_c + b_xe * b_s), (R, 2 * BP))


@triton.jit
def _cos_sin(start, o_t, b_f, sign):
    """cos φ and sign·sin φ [BT, BP] for positions start + o_t and pair frequencies b_f."""
    b_ang = phase_angle((start + o_t).to(tl.float64)[:, None] * b_f[None, :])
    return tl.cos(b_ang), tl.sin(b_ang) * sign


# A position (start) and a length (T) are never specialisation keys: Triton would otherwise
# compile a variant per class of each (== 1, divisible by 16, neither), i.e. anew for new prompt
# lengths and decode positions. The row stride T·2·NP is formed in the kernel, so its
# divisibility by 16 (the vectorised loads) still follows from NP.
@triton.jit(do_not_specialize=["start", "T"])
def rope_rotate_kernel(x, out, freqs, start, BH, T, NP, sign, RPP,
                       BT: tl.constexpr, BP: tl.constexpr, G: tl.constexpr,
                       START_PTR: tl.constexpr, PER_ROW: tl.constexpr):
    i_t, i_p, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_p = i_p * BP + tl.arange(0, BP)
    m_t, m_p = o_t < T, o_p < NP
    # Exact phase: (start + t)·f in float64, reduced mod 1 before the cast to float32.
    b_f = tl.load(freqs + o_p, mask=m_p, other=0.)                         # float64 [BP]
    if not PER_ROW:
        if START_PTR:
            # The position lives on the device (int64 [1]): a captured CUDA graph replays the
            # decode step with whatever position the tensor holds at replay time.
            b_c, b_s = _cos_sin(tl.load(start), o_t, b_f, sign)
        else:
            b_c, b_s = _cos_sin(start, o_t, b_f, sign)
    # The tile is the contiguous [BT, 2·BP] block of columns 2j, 2j+1 (wide vector loads);
    # split into the even and odd members of each pair, rotate, and join back.
    o_n = i_p * (2 * BP) + tl.arange(0, 2 * BP)
    m = m_t[:, None] & (o_n < 2 * NP)[None, :]
    o_x = o_t[:, None].to(tl.int64) * (2 * NP) + o_n[None, :]
    stride_bh = T.to(tl.int64) * (2 * NP)
    # Walk this program's group of G batch·head rows by advancing the (64-bit) pointers.
    p_x = x + i_g.to(tl.int64) * G * stride_bh + o_x
    p_out = out + i_g.to(tl.int64) * G * stride_bh + o_x
    for g in range(tl.minimum(G, BH - i_g * G)):
        if PER_ROW:
            # One position per stream (int64 [B] on the device), shared by its RPP rows
            # (heads): streams at different positions are decoded as one batch.
            b_c, b_s = _cos_sin(tl.load(start + (i_g * G + g) // RPP), o_t, b_f, sign)
        b_x = tl.load(p_x, mask=m, other=0.).to(tl.float32)
        b_y = rotate_pairs(b_x, b_c, b_s, BT, BP)
        tl.store(p_out, b_y.to(out.dtype.element_ty), mask=m)
        p_x += stride_bh
        p_out += stride_bh


def rope_rotate_triton(x: torch.Tensor, start, inverse: bool, freqs64: torch.Tensor,
                       inplace: bool = False):
    """Rotate x [..., T, N] (contiguous) by the angles of positions start…; ``freqs64`` [N/2]
    float64 pair frequencies on x's device. ``start`` is an int, or an int64 tensor on x's
    device read by the kernel (CUDA-graph decoding): [1] (one position for every row) or
    [x.shape[0]] (one per row of the first dimension: streams at different positions). Returns
    a new tensor in x's dtype, or x itself rotated in place when ``inplace`` (x contiguous):
    every program reads its tile before it writes the same tile, and tiles do not overlap, so
    in place is safe."""
    if inplace and not x.is_contiguous():
        raise ValueError("x: an in-place rotation needs a contiguous tensor")
    on_device = isinstance(start, torch.Tensor)
    per_row = on_device and start.numel() != 1
    if per_row and (x.dim() < 3 or start.numel() != x.shape[0]):
        raise ValueError(f"start: expected an int64 tensor [1] or [{x.shape[0]}] (one position "
                         f"per row of x {list(x.shape)}), got {list(start.shape)}")
    x = x.contiguous()
    T, N = x.shape[-2], x.shape[-1]
    BH = x.numel() // max(1, T * N)
    out = x if inplace else torch.empty_like(x)
    if x.numel() == 0:
        return out
    NP = N // 2
    BT = 16
    BP = min(64, triton.next_power_of_2(NP))
    # Each program reuses its cos/sin tile over G batch·head rows; G trades trig work against
    # parallelism (enough programs to fill the chip at small T). Per-row positions recompute
    # the tile per row.
    G = min(16, BH)
    grid = (triton.cdiv(T, BT), triton.cdiv(NP, BP), triton.cdiv(BH, G))
    rope_rotate_kernel[grid](x, out, freqs64, start if on_device else int(start), BH, T, NP,
                             -1.0 if inverse else 1.0, BH // x.shape[0] if per_row else 1,
                             BT=BT, BP=BP, G=G, START_PTR=on_device, PER_ROW=per_row,
                             num_warps=4)
    return out

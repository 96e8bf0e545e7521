"""Fused kernels for BDH's sparse decoding step: fewer launches per layer.

At batch 1 a decoding step is bound by its launches, not its bytes (H200, 2026-12-04: the
sparse step read about half the dense step's bytes and ran at the same 0.48 ms per token, ~20
kernels per layer inside the CUDA graph). These kernels merge the small ones around the sparse
step and the sparse decoder product (`sparse_step.py`), so a layer is 8 launches:

    encode_rope   xs = relu(x @ encoder) per head (rounded to the model dtype, as the dense bmm),
                  q = k = RoPE(xs) at a device-held position (exact phases, as
                  `kernels.rope.triton_rotate`), and the non-zeros of q per tile (the first
                  pass of the compaction)                                      [bmm, relu, rope, count]
    compact       `sparse_step.compact_from_tiles`
    step          `sparse_step.sparse_step_partials`
    reduce_ln     o = Σ partials (rounded; BS partials per load), a = LayerNorm(o)   [reduce, LN]
    encode_gate   ys = relu(a @ encoder_v), xy = xs · ys as [B, nh·N], and the non-zeros of xy
                  per tile                                                     [bmm, relu, mul, copy, count]
    compact, rows `sparse_step.sparse_rows_partials` over xy's non-zeros
    reduce_ln     y = Σ partials (rounded), x ← LN(x + LN(y))                 [reduce, LN, add, LN]

Every intermediate is rounded to the model's dtype where the PyTorch modules round it, so the
result equals `bdh.sparse_decode.sparse_decode_step`'s up to float32 summation order. The
encoders are read once per block of BB sequences (a [BB, D] × [D, 2·BP] tl.dot), so large
batches do not multiply their traffic. The readable reference is the unfused step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rope.triton_rotate import phase_angle, rotate_pairs
from .sparse_step import _pow2_tile
from .step import partial_rows_per_load, sum_partials


@triton.jit
def _tile_product(x_ptr, x_row, m_b, w_ptr, o_n, m_n, D, N, BB: tl.constexpr,
                  BD: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Σ_d x[row_b, d] · w[d, n] for the BB rows x_row (element offsets of each row's start)
    and the BN columns o_n of w [D, N] (row-major), float32 [BB, BN]."""
    acc = tl.zeros([BB, BN], tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(x_ptr + x_row[:, None] + o_d[None, :], mask=m_b[:, None] & m_d[None, :],
                      other=0.)
        b_w = tl.load(w_ptr + o_d[:, None] * N + o_n[None, :], mask=m_d[:, None] & m_n[None, :],
                      other=0.)
        acc += tl.dot(b_x, b_w, input_precision=PREC)
    return acc


@triton.jit
def encode_rope_kernel(x, enc, freqs, pos, xs, qk, tiles, B, D, N, NH, NT,
                       BB: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
                       PREC: tl.constexpr):
    """grid (cdiv(N, 2·BP), NH, cdiv(B, BB)). x [B, D]; enc [NH, D, N]; freqs float64 [N/2];
    pos int64 [1]. Writes xs [NH, B, N], qk [B, NH, N] and tiles[b·NH + h, t]."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_b = i_b * BB + tl.arange(0, BB)
    m_b = o_b < B
    o_n = i_t * (2 * BP) + tl.arange(0, 2 * BP)
    m_n = o_n < N
    acc = _tile_product(x, o_b.to(tl.int64) * D, m_b, enc + i_h.to(tl.int64) * D * N, o_n, m_n,
                        D, N, BB, BD, 2 * BP, PREC)
    b_xs = tl.maximum(acc, 0.).to(xs.dtype.element_ty)          # as relu(bmm) in the model dtype
    m = m_b[:, None] & m_n[None, :]
    tl.store(xs + (i_h * B + o_b).to(tl.int64)[:, None] * N + o_n[None, :], b_xs, mask=m)
    # RoPE at the device position: the exact phase pos·f_j in float64, reduced mod 1.
    o_p = i_t * BP + tl.arange(0, BP)
    b_f = tl.load(freqs + o_p, mask=o_p < N // 2, other=0.)
    b_ang = phase_angle(tl.load(pos).to(tl.float64) * b_f)
    b_q = rotate_pairs(b_xs.to(tl.float32), tl.cos(b_ang)[None, :], tl.sin(b_ang)[None, :],
                       BB, BP).to(qk.dtype.element_ty)
    row = (o_b * NH + i_h).to(tl.int64)
    tl.store(qk + row[:, None] * N + o_n[None, :], b_q, mask=m)
    nz = tl.sum(((b_q != 0) & m).to(tl.int32), 1)
    tl.store(tiles + row * NT + i_t, nz, mask=m_b)


@triton.jit
def encode_gate_kernel(a, enc_v, xs, xy, tiles, B, D, N, NH, NT,
                       BB: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                       PREC: tl.constexpr):
    """grid (cdiv(N, BN), NH, cdiv(B, BB)). a [B, NH, D]; enc_v [NH, D, N]; xs [NH, B, N].
    Writes xy[b, h·N + n] = xs · relu(a @ enc_v) and tiles[b, h·cdiv(N, BN) + t]
    (NT = NH·cdiv(N, BN) tiles per row)."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_b = i_b * BB + tl.arange(0, BB)
    m_b = o_b < B
    o_n = i_t * BN + tl.arange(0, BN)
    m_n = o_n < N
    acc = _tile_product(a, (o_b * NH + i_h).to(tl.int64) * D, m_b,
                        enc_v + i_h.to(tl.int64) * D * N, o_n, m_n, D, N, BB, BD, BN, PREC)
    b_ys = tl.maximum(acc, 0.).to(xy.dtype.element_ty)
    m = m_b[:, None] & m_n[None, :]
    b_xs = tl.load(xs + (i_h * B + o_b).to(tl.int64)[:, None] * N + o_n[None, :], mask=m,
                   other=0.)
    b_xy = (b_xs.to(tl.float32) * b_ys.to(tl.float32)).to(xy.dtype.element_ty)
    tl.store(xy + o_b.to(tl.int64)[:, None] * (NH * N) + (i_h * N + o_n)[None, :], b_xy, mask=m)
    nz = tl.sum(((b_xy != 0) & m).to(tl.int32), 1)
    tl.store(tiles + o_b.to(tl.int64) * NT + i_h * tl.cdiv(N, BN) + i_t, nz, mask=m_b)


@triton.jit
def _layer_norm(y, m, V, eps):
    """LayerNorm without affine over the V valid entries (mask m) of a float32 row."""
    mean = tl.sum(tl.where(m, y, 0.), 0) / V
    d = tl.where(m, y - mean, 0.)
    return d * tl.rsqrt(tl.sum(d * d, 0) / V + eps)


@triton.jit
def reduce_layernorm_kernel(part, res, out, NS, V, eps, BS: tl.constexpr, BV: tl.constexpr,
                            HAS_RES: tl.constexpr):
    """grid (R,). y = Σ_s part[r, s] (fixed order: BS partials per tile, tile sums in order),
    rounded to out's dtype; out = LN(y), or with HAS_RES out = LN(res + LN(y)), rounding to out's
    dtype where the modules do. At batch 1 one program sums ~66 (state step) or ~264 (decoder
    rows) partials: this was ~10 µs per launch, the largest item of the H200 profile (12-04),
    before `sum_partials` loaded BS rows at once."""
    r = tl.program_id(0).to(tl.int64)
    o_v = tl.arange(0, BV)
    m = o_v < V
    acc = sum_partials(part, r, NS, V, o_v, m, BS, BV)
    dt = out.dtype.element_ty
    y = _layer_norm(acc.to(dt).to(tl.float32), m, V, eps).to(dt).to(tl.float32)
    if HAS_RES:
        z = (tl.load(res + r * V + o_v, mask=m, other=0.).to(tl.float32) + y).to(dt)
        y = _layer_norm(z.to(tl.float32), m, V, eps)
    tl.store(out + r * V + o_v, y.to(dt), mask=m)


def _prec(dtype: torch.dtype) -> str:
    """float32 models multiply in IEEE float32 (as their cuBLAS bmm); 16-bit ones natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def encode_rope(x, enc, freqs64, pos, *, BP: int = 64):
    """x [B, D], enc [NH, D, N] (contiguous, one dtype), freqs64 [N/2] float64, pos int64 [1]:
    (xs [NH, B, N], qk [B, NH, N], tiles int32 [B·NH, cdiv(N, 2·BP)], tile width 2·BP)."""
    B, D = x.shape
    NH, N = enc.shape[0], enc.shape[2]
    BP = max(8, min(BP, triton.next_power_of_2(N // 2)))
    NT = triton.cdiv(N, 2 * BP)
    xs = torch.empty(NH, B, N, dtype=x.dtype, device=x.device)
    qk = torch.empty(B, NH, N, dtype=x.dtype, device=x.device)
    tiles = torch.empty(B * NH, NT, dtype=torch.int32, device=x.device)
    BB = 16
    encode_rope_kernel[(NT, NH, triton.cdiv(B, BB))](x, enc, freqs64, pos, xs, qk, tiles, B, D,
                                                     N, NH, NT, BB=BB, BD=_pow2_tile(D, 64), BP=BP,
                                                     PREC=_prec(x.dtype), num_warps=4)
    return xs, qk, tiles, 2 * BP


def encode_gate(a, enc_v, xs, *, BN: int = 128):
    """a [B, NH, D], enc_v [NH, D, N], xs [NH, B, N]: (xy [B, NH·N], tiles int32
    [B, NH·cdiv(N, BN)], tile width BN; N a multiple of BN so that tiles are contiguous)."""
    B, NH, D = a.shape
    N = enc_v.shape[2]
    BN = max(16, min(BN, triton.next_power_of_2(N)))
    if N % BN:
        raise ValueError(f"encode_gate: N = {N} must be a multiple of the tile {BN}")
    NT = NH * (N // BN)
    xy = torch.empty(B, NH * N, dtype=a.dtype, device=a.device)
    tiles = torch.empty(B, NT, dtype=torch.int32, device=a.device)
    BB = 16
    encode_gate_kernel[(N // BN, NH, triton.cdiv(B, BB))](a, enc_v, xs, xy, tiles, B, D, N, NH,
                                                          NT, BB=BB, BD=_pow2_tile(D, 64), BN=BN,
                                                          PREC=_prec(a.dtype), num_warps=4)
    return xy, tiles, BN


def reduce_layernorm(part, out_dtype, eps, res=None):
    """part [R, NS, V] float32 → LN(Σ part) [R, V] in out_dtype, or LN(res + LN(Σ part))."""
    R, NS, V = part.shape
    out = torch.empty(R, V, dtype=out_dtype, device=part.device)
    BV = max(16, triton.next_power_of_2(V))
    BS = partial_rows_per_load(NS, BV)
    reduce_layernorm_kernel[(R,)](part, res if res is not None else out, out, NS, V, float(eps),
                                  BS=BS, BV=BV, HAS_RES=res is not None, num_warps=8)
    return out

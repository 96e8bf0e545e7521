"""Fused kernels for BDH's sparse decoding step: fewer launches per layer.

At batch 1 a decoding step is bound by its launches, not its bytes (measured on an H200: the
sparse step read about half the dense step's bytes and ran at the same 0.48 ms per token, ~20
kernels per layer inside the CUDA graph). These kernels merge the small ones around the sparse
step and the sparse decoder product (`sparse_step.py`), so a layer is 8 launches:

    encode_rope   xs = relu(x @ encoder) per head (rounded to the model dtype, as the dense bmm),
                  q = k = RoPE(xs) at a device-held position (exact phases, as
                  `kernels.rope.triton_rotate`), and the non-zeros of q per tile (the first
                  pass of the compaction)                            [bmm, relu, rope, count]
    compact       `sparse_step.compact_from_tiles`
    step          `sparse_step.sparse_step_partials`
    reduce_ln     o = Σ partials (rounded), a = LayerNorm(o)                    [reduce, LN]
    encode_gate   ys = relu(a @ encoder_v), xy = xs · ys as [B, nh·N], and the non-zeros of xy
                  per tile                                      [bmm, relu, mul, copy, count]
    compact, rows `sparse_step.sparse_rows_partials` over xy's non-zeros
    reduce_ln     y = Σ partials (rounded), x ← LN(x + LN(y))                 [reduce, LN, add, LN]

reduce_ln is parallel over columns: grid (cdiv(V, BC), R) with narrow column blocks (16–32
columns), each program summing its [NS, BC] slab of partials (256 partial rows per load) into a
float32 scratch row; the last program of a row to finish (an int32 counter per row, atomically
incremented) applies the LayerNorm to the whole row and resets the counter. One program per row
(grid (R,)) was ~8.8 µs per launch, 12 launches per token, the largest item of the H200
profile: one SM cannot pull ~66–528 partial rows fast enough. Column-parallel: 3.5 µs per
launch, 3,033 → 3,756 tok/s at batch 1 (H200, BENCHMARKS.md).

Each launcher takes ``launch=`` (`EncodeRopeLaunch`, `EncodeGateLaunch`, `ReduceLaunch`; None:
the default for the shape, `launches.default_launch`).

Every intermediate is rounded to the model's dtype where the PyTorch modules round it, so the
result equals `bdh.sparse_decode.sparse_decode_step`'s up to float32 summation order. The
encoders are read once per block of BB sequences (a [BB, D] × [D, 2·BP] tl.dot), so large
batches do not multiply their traffic. The readable reference is the unfused step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import dot_precision, length_bucket, pow2_tile
from ..rope.triton_rotate import phase_angle, rotate_pairs
from .launches import EncodeGateLaunch, EncodeRopeLaunch, ReduceLaunch, default_launch
from .step import default_reduce_launch, reduce_tiles, sum_partials


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
def reduce_layernorm_kernel(part, res, out, y, counter, NS, V, eps, BS: tl.constexpr,
                            BC: tl.constexpr, BV: tl.constexpr, HAS_RES: tl.constexpr):
    """grid (cdiv(V, BC), R). Program (c, r) sums the columns c·BC … of part[r] (fixed order:
    BS partials per tile, tile sums in order, so deterministic) into the float32 scratch
    y[r]; the last program of row r to finish reads the whole row y[r] and writes out[r] =
    LN(y) rounded to out's dtype, or with HAS_RES LN(res + LN(y)), rounding where the modules do.

    Why columns: at batch 1 there are 1–4 rows of V = 256; one program per row (grid (R,)) was
    a chain of dependent loads on one SM, ~8.8 µs per launch (H200 profile). Narrow column
    blocks put 16–64 programs in flight, each with 1–3 loads of up to 256 partial rows.
    The LayerNorm needs the whole row, hence "the last program finishes": counter[r] (int32,
    0 at launch) counts the blocks stored so far. Measured: 3.5 µs per launch (H200)."""
    i_c = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < V
    tl.store(y + r * V + o_c, sum_partials(part, r, NS, V, o_c, m_c, BS, BC), mask=m_c)
    # Every thread's stores of y must precede the (single-thread) atomic below: the barrier
    # orders them within the program, the atomic's release publishes them to the GPU, and its
    # acquire (in the program that sees the others' increments) makes theirs visible to it.
    tl.debug_barrier()
    done = tl.atomic_add(counter + r, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        o_v = tl.arange(0, BV)
        m = o_v < V
        # .cg: read through L2 (coherent), never a stale L1 line of another SM's blocks.
        acc = tl.load(y + r * V + o_v, mask=m, other=0., cache_modifier=".cg")
        dt = out.dtype.element_ty
        z = _layer_norm(acc.to(dt).to(tl.float32), m, V, eps).to(dt).to(tl.float32)
        if HAS_RES:
            z = (tl.load(res + r * V + o_v, mask=m, other=0.).to(tl.float32) + z).to(dt)
            z = _layer_norm(z.to(tl.float32), m, V, eps)
        tl.store(out + r * V + o_v, z.to(dt), mask=m)
        # Back to 0 for the next launch (every program of this row has incremented it by now);
        # the next launch on the stream starts after this one ends, graph replays included.
        tl.store(counter + r, 0)


# One int32 counter per row for reduce_layernorm, per device, kept at 0 between launches (each
# launch's last programs reset their rows). Why cached: a torch.zeros per call is one more
# launch (a memset) per reduce, 12 per token. It holds scratch buffers, not launch choices:
# no call reads a setting from it, so what one caller does cannot change another's launch, and
# every launch finds its rows at 0 whatever ran before. Launches that share it must not overlap
# in time: fine on one stream (eager calls, graph replays); two streams running
# reduce_layernorm at once would need counters of their own.
_ROW_COUNTERS: dict = {}


def _row_counters(R: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 tensor of at least R entries on ``device`` (see _ROW_COUNTERS)."""
    c = _ROW_COUNTERS.get(device)
    if c is not None and c.numel() >= R:
        return c
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Under capture torch.zeros is recorded, not run: the memory would not be zero for an
        # eager call later, so do not cache it. The graph zeroes it on every replay (a memset
        # node), which is correct. A warm-up call before capture (glassbrain.cuda_graph runs
        # one) fills the cache and avoids this.
        return torch.zeros(R, dtype=torch.int32, device=device)
    c = torch.zeros(max(R, 1024, 2 * (c.numel() if c is not None else 0)), dtype=torch.int32,
                    device=device)
    _ROW_COUNTERS[device] = c
    return c


def encode_rope(x, enc, freqs64, pos, *, launch: EncodeRopeLaunch | None = None):
    """x [B, D], enc [NH, D, N] (contiguous, one dtype), freqs64 [N/2] float64, pos int64 [1]:
    (xs [NH, B, N], qk [B, NH, N], tiles int32 [B·NH, cdiv(N, 2·BP)], tile width 2·BP).
    Products in IEEE float32 for float32 models (as their cuBLAS bmm), natively for 16-bit."""
    B, D = x.shape
    NH, N = enc.shape[0], enc.shape[2]
    launch = launch or default_launch(EncodeRopeLaunch, "hebbian_encode_rope", x.device, D=D,
                                      N=N, NH=NH, B=length_bucket(B), dtype=x.dtype)
    BP = max(8, min(launch.BP, triton.next_power_of_2(N // 2)))
    NT = triton.cdiv(N, 2 * BP)
    xs = torch.empty(NH, B, N, dtype=x.dtype, device=x.device)
    qk = torch.empty(B, NH, N, dtype=x.dtype, device=x.device)
    tiles = torch.empty(B * NH, NT, dtype=torch.int32, device=x.device)
    BB = launch.BB
    encode_rope_kernel[(NT, NH, triton.cdiv(B, BB))](
        x, enc, freqs64, pos, xs, qk, tiles, B, D, N, NH, NT, BB=BB, BD=pow2_tile(D, launch.BD),
        BP=BP, PREC=dot_precision(x.dtype), num_warps=launch.warps)
    return xs, qk, tiles, 2 * BP


def encode_gate(a, enc_v, xs, *, BN: int | None = None,
                launch: EncodeGateLaunch | None = None):
    """a [B, NH, D], enc_v [NH, D, N], xs [NH, B, N]: (xy [B, NH·N], tiles int32
    [B, NH·cdiv(N, BN)], tile width BN; N a multiple of BN so that tiles are contiguous).
    The tile width is ``BN`` when given, else ``launch.BN`` lowered to N's largest
    power-of-two factor."""
    B, NH, D = a.shape
    N = enc_v.shape[2]
    launch = launch or default_launch(EncodeGateLaunch, "hebbian_encode_gate", a.device, D=D,
                                      N=N, NH=NH, B=length_bucket(B), dtype=a.dtype)
    BN = pow2_tile(N, BN or min(launch.BN, N & -N))
    if N % BN:
        raise ValueError(f"encode_gate: N = {N} must be a multiple of the tile {BN}")
    NT = NH * (N // BN)
    xy = torch.empty(B, NH * N, dtype=a.dtype, device=a.device)
    tiles = torch.empty(B, NT, dtype=torch.int32, device=a.device)
    BB = launch.BB
    encode_gate_kernel[(N // BN, NH, triton.cdiv(B, BB))](
        a, enc_v, xs, xy, tiles, B, D, N, NH, NT, BB=BB, BD=pow2_tile(D, launch.BD), BN=BN,
        PREC=dot_precision(a.dtype), num_warps=launch.warps)
    return xy, tiles, BN


def reduce_layernorm(part, out_dtype, eps, res=None, *, launch: ReduceLaunch | None = None):
    """part [R, NS, V] float32 → LN(Σ part) [R, V] in out_dtype, or LN(res + LN(Σ part)).
    One launch, grid (cdiv(V, BC), R): see reduce_layernorm_kernel."""
    R, NS, V = part.shape
    launch = launch or default_reduce_launch(R, NS, V, part.device)
    out = torch.empty(R, V, dtype=out_dtype, device=part.device)
    y = torch.empty(R, V, dtype=torch.float32, device=part.device)   # Σ part, before rounding
    BV = max(16, triton.next_power_of_2(V))
    BC, BS = reduce_tiles(R, NS, V, launch)
    reduce_layernorm_kernel[(triton.cdiv(V, BC), R)](
        part, res if res is not None else out, out, y, _row_counters(R, part.device), NS, V,
        float(eps), BS=BS, BC=BC, BV=BV, HAS_RES=res is not None, num_warps=launch.warps)
    return out

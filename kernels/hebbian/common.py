"""Pieces every chunked Hebbian kernel shares: decay powers, the causal intra-chunk mask with
its decay weights, where a row's tokens and a chunk's or a walk's span lie (both layouts, dense
batch or packed varlen row), the state tiles a walk starts from and ends in, and the warp count
of a tile (see chunk_state.py for the notation)."""
from __future__ import annotations

import triton
import triton.language as tl

# The kernels' arguments that carry a length (tokens, chunks, a segment's start or length):
# marked do_not_specialize in every kernel, so no length is part of the compiled variant's key.
# Triton would otherwise compile a variant per class of each (== 1, divisible by 16, neither):
# T = 1000, 1500, 2000 at chunk 64 gave three variants of every kernel. Nothing is lost for
# vectorised loads: every address multiplies a length by K, V or H·K, whose divisibility by 16
# Triton still knows (those stay specialised), and time is never the contiguous axis.
LENGTH_ARGS = ("T", "t0", "NTS", "TDV", "t_dv")


@triton.jit
def _decay_pow(n, b_lg):
    """γ^n for a tensor n of (non-negative) exponents, from log2 γ."""
    return tl.exp2(n.to(tl.float32) * b_lg)


@triton.jit
def _causal_weights(i_q, i_k, b_lg, STRICT: tl.constexpr):
    """The intra-chunk mask and decay weights for query positions i_q and key positions i_k
    (index tensors that broadcast to the tile, e.g. o_i[:, None] and o_i[None, :], or swapped
    for a transposed tile): m = (i_k < i_q) strict | (i_k ≤ i_q) inclusive, and
    D = γ^{i_q − i_k − shift} on the mask (shift 1 strict, 0 inclusive). Kernels without decay
    use only m; D is then dead code and compiled away."""
    if STRICT:
        m = i_q > i_k
    else:
        m = i_q >= i_k
    b_D = _decay_pow(tl.where(m, i_q - i_k - (1 if STRICT else 0), 0), b_lg)
    return m, b_D


@triton.jit
def _query_decay(o_i, b_lg, STRICT: tl.constexpr):
    """w_in_i = γ^i (strict) | γ^{i+1} (inclusive): the decay of the state before the chunk as
    seen by the chunk's query i."""
    return _decay_pow(o_i + (0 if STRICT else 1), b_lg)


@triton.jit
def _key_decay(o_i, m_t, L, b_lg):
    """w_k_j = γ^{L-1-j}: key j's weight in the state after a chunk of L tokens (0 past T)."""
    return tl.where(m_t, _decay_pow(tl.maximum(L - 1 - o_i, 0), b_lg), 0.)


@triton.jit
def _row_offset(i_b, i_h, NH, T, D, BTHK: tl.constexpr):
    """(offset of token 0 of row (batch i_b, head i_h), stride between tokens) in a contiguous
    [B, NH, T, D] ("bhtk") or [B, T, NH, D] ("bthk") tensor; i_b, i_h int64. The strides are
    formed here from NH and D, never passed in: a passed T·D would carry T into the
    specialisation key (see `LENGTH_ARGS`)."""
    if BTHK:
        return (i_b * T * NH + i_h) * D, NH * D
    else:
        return (i_b * NH + i_h) * T * D, D


@triton.jit
def _row(x, i_b, i_h, NH, T, D, BTHK: tl.constexpr):
    """(pointer to token 0 of row (batch i_b, head i_h) of x, stride between tokens)."""
    off, stride = _row_offset(i_b, i_h, NH, T, D, BTHK)
    return x + off, stride


@triton.jit
def _chunk_span(chunks, i_t, T, t0, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token (int64), end of its sequence) of the segment's chunk i_t: t0 + i_t·BT and T
    in a dense batch, the segment's chunk table (schedule.py) in a packed varlen row."""
    if IS_VARLEN:
        return tl.load(chunks + 2 * i_t).to(tl.int64), tl.load(chunks + 2 * i_t + 1)
    else:
        return (t0 + i_t * BT).to(tl.int64), T


@triton.jit
def _walk(seqs, i_n, T, t0, NTS, IS_VARLEN: tl.constexpr):
    """What the state kernels' program for state row i_n walks in this segment: (first token,
    end of its sequence, chunks, buffer slot of the first, state row, starts from the carry,
    ends in the carry). Token positions stay int32 (masks on them cost half the registers of
    int64 ones; positions < 2^31 are checked on the host): cast them at the address. Dense:
    row i_n, tokens t0 … of every row, no carries; varlen: row i_n of the segment's sequence
    table (schedule.py)."""
    if IS_VARLEN:
        p = seqs + 8 * i_n
        return (tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3),
                tl.load(p + 4).to(tl.int64), tl.load(p + 5) & 1, tl.load(p + 5) & 2)
    else:
        zero = NTS * 0                          # a tensor zero: the tuple's types match varlen's
        return t0, T, NTS, zero, i_n, zero, zero


@triton.jit
def _tile_if(o_k, K, m_v, on):
    """The [BK, BV] mask of a state tile (rows o_k < K, columns m_v) where ``on``, else all
    false: switches a whole load or store on or off by a run-time flag."""
    return (o_k < tl.where(on, K, 0))[:, None] & m_v[None, :]


@triton.jit
def _state_in(h0, hc, i_s, i_h, H, o_k, o_v, K, V, c_in, BK: tl.constexpr, BV: tl.constexpr,
              USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The float32 [BK, BV] state tile a walk starts from: row i_s of h0 [rows, H, K, V] (zeros
    without USE_H0), or in a varlen segment the carry hc [H, K, V] when ``c_in`` (the sequence
    began in an earlier segment)."""
    m_v = o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if IS_VARLEN:
        if USE_H0:
            b_h += tl.load(h0 + (i_s * H + i_h) * K * V + o_kv,
                           mask=_tile_if(o_k, K, m_v, c_in == 0), other=0.)
        b_h += tl.load(hc + i_h * K * V + o_kv, mask=_tile_if(o_k, K, m_v, c_in != 0), other=0.)
    elif USE_H0:
        b_h += tl.load(h0 + (i_s * H + i_h) * K * V + o_kv,
                       mask=(o_k < K)[:, None] & m_v[None, :], other=0.)
    return b_h


@triton.jit
def _state_out(ht, hc, b_h, i_s, i_h, H, o_k, o_v, K, V, c_out, STORE_HT: tl.constexpr,
               IS_VARLEN: tl.constexpr):
    """Store the float32 state tile a walk ends in: to row i_s of ht (when STORE_HT), or in a
    varlen segment to the carry hc [H, K, V] when ``c_out`` (the sequence goes on in the next
    segment)."""
    m_v = o_v < V
    o_kv = o_k[:, None] * V + o_v[None, :]
    if IS_VARLEN:
        if STORE_HT:
            tl.store(ht + (i_s * H + i_h) * K * V + o_kv, b_h,
                     mask=_tile_if(o_k, K, m_v, c_out == 0))
        tl.store(hc + i_h * K * V + o_kv, b_h, mask=_tile_if(o_k, K, m_v, c_out != 0))
    elif STORE_HT:
        tl.store(ht + (i_s * H + i_h) * K * V + o_kv, b_h, mask=(o_k < K)[:, None] & m_v[None, :])


def bhtd(x, bthk: bool) -> tuple[int, int, int, int]:
    """(batch, heads, T, last dim) of x [B, heads, T, D] or, when ``bthk``, [B, T, heads, D]."""
    B, a, b, D = x.shape
    return (B, b, a, D) if bthk else (B, a, b, D)


def or_placeholder(x, placeholder):
    """x, or ``placeholder`` for a pointer argument that the launched variant never reads."""
    return placeholder if x is None else x


def _warps(*tiles: int) -> int:
    """4 warps up to 64×64-ish float32 accumulators, 8 above (keeps registers under the cap).
    The interpreter ignores the count."""
    return 4 if max(tiles) * sorted(tiles)[-2] <= 128 * 64 else 8

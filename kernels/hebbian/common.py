"""Pieces every chunked Hebbian kernel shares: decay powers, the causal intra-chunk mask with
its decay weights, and the warp count of a tile (see chunk_state.py for the notation)."""
from __future__ import annotations

import triton
import triton.language as tl


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


def _warps(*tiles: int) -> int:
    """4 warps up to 64×64-ish float32 accumulators, 8 above (keeps registers under the cap).
    The interpreter ignores the count."""
    return 4 if max(tiles) * sorted(tiles)[-2] <= 128 * 64 else 8

"""The Triton kernel of `normalised_step.normalised_hebbian_step` (see there for the math)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import INTERPRET


@triton.jit
def normalised_step_kernel(q, k, v, s, o, sqb, sqh, skb, skh, svb, svh, sob, soh, H, G, K, V,
                           eps, BK: tl.constexpr, BV: tl.constexpr, RELU: tl.constexpr):
    """One program per (row, head): the normaliser column first (its φ(q)·z is every V tile's
    denominator), then S' and o tile by tile along V."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = tl.load(q + i_b * sqb + i_h * sqh + o_k, mask=m_k, other=0.).to(tl.float32)
    b_k = tl.load(k + i_b * skb + i_hk * skh + o_k, mask=m_k, other=0.).to(tl.float32)
    if RELU:
        f_q, f_k = tl.maximum(b_q, 0.), tl.maximum(b_k, 0.)
    else:
        f_q = tl.where(b_q > 0, b_q + 1., tl.exp(tl.minimum(b_q, 0.)))
        f_k = tl.where(b_k > 0, b_k + 1., tl.exp(tl.minimum(b_k, 0.)))
    f_q, f_k = tl.where(m_k, f_q, 0.), tl.where(m_k, f_k, 0.)
    W = V + 1
    row = s + i_bh * K * W
    p_z = row + o_k * W + V
    z = tl.load(p_z, mask=m_k, other=0.) + f_k
    tl.store(p_z, z, mask=m_k)
    den = tl.sum(f_q * z, 0) + eps
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v + i_b * svb + i_hk * svh + o_v, mask=m_v, other=0.).to(tl.float32)
        p_s = row + o_k[:, None] * W + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_s = tl.load(p_s, mask=m_kv, other=0.) + f_k[:, None] * b_v[None, :]
        tl.store(p_s, b_s, mask=m_kv)
        num = tl.sum(f_q[:, None] * b_s, 0)
        tl.store(o + i_b * sob + i_h * soh + o_v, (num / den).to(o.dtype.element_ty), mask=m_v)


def normalised_step_triton(q, k, v, state, out, *, feature_map="elu", eps=1e-6):
    """The step on validated inputs (`normalised_step.check_normalised_step`); writes ``out``
    [B,H,V] and returns it."""
    B, H, K = q.shape
    V = v.shape[2]
    if INTERPRET and torch.bfloat16 in (q.dtype, k.dtype, v.dtype):
        # The interpreter mis-loads bf16: run in float32 (S' is float32 anyway).
        o32 = torch.empty(B, H, V, dtype=torch.float32, device=q.device)
        normalised_step_triton(q.float(), k.float(), v.float(), state, o32,
                               feature_map=feature_map, eps=eps)
        return out.copy_(o32)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 8192 // BK))
    normalised_step_kernel[(B * H,)](
        q, k, v, state, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), H, H // k.shape[1], K, V, float(eps),
        BK=BK, BV=BV, RELU=feature_map == "relu", num_warps=4 if BK * BV <= 4096 else 8)
    return out

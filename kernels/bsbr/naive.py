"""BSBR, made causal: the readable reference of the whole `kernels.bsbr` contract.

Per (batch, head), chunk size C, chunk c(t) = t // C of key index t:

    local_t = softmax(scale · q_t k_sᵀ) over keys s <= t with c(s) = c(t)    (scale 1/√K)
    F_j     = Σ_{s in chunk j} k_sᵀ v_s,   h_j = mean_{s in chunk j} hk_s      (complete chunks)
    p_tj    = softmax over the candidates j of r_t · h_j / √M, kept to the top_k scores
              (candidates: every bank slot, and this call's chunks j < c(t))
    o_t     = local_t + long_scale · q_t Σ_j p_tj F_j

Dense masks and full score matrices, so short sequences only; it is the oracle every faster
path is tested against. It computes in float64 when given float64 (states in float32
otherwise, as in the contract).

A call continues a stream whose keys start at a chunk boundary: ``offset`` tokens of the
current (partial) chunk came before this call's queries, so query i sits at key index
offset + i, in chunk c_i = (offset + i) // C.

Non-finite scores: a candidate scored NaN or +inf stays a candidate (topk ranks NaN first)
and makes the query's weights NaN; -inf is no candidate (as a masked slot).

Packed sequences (``cu_seqlens``): every sequence is computed as if it were called alone
(`per_sequence`).
"""
from __future__ import annotations

import math

import torch


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Chunk states are float32, or float64 when the inputs are float64 (the oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_local_attention_ref(q, k, v, *, chunk_size, offset=0, scale=None):
    """Softmax attention of query i over keys s <= offset + i in the same chunk.
    q [B,H,Tq,K], k [B,H,Tk,K], v [B,H,Tk,V], Tk = offset + Tq. Returns [B,H,Tq,V] in v's dtype."""
    Tq, Tk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    t = torch.arange(Tq, device=q.device)[:, None] + offset           # key index of each query
    s = torch.arange(Tk, device=q.device)[None, :]
    visible = (s <= t) & (s // chunk_size == t // chunk_size)
    cd = state_dtype(q)
    scores = scale * torch.einsum("bhtk,bhsk->bhts", q.to(cd), k.to(cd))
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhts,bhsv->bhtv", scores.softmax(-1), v.to(cd)).to(v.dtype)


def chunk_states_ref(k, v, hk, *, chunk_size):
    """States of the COMPLETE chunks of the keys: F_j = Σ_{s in j} k_sᵀ v_s,
    h_j = mean_{s in j} hk_s.
    Returns (F [B,H,nC,K,V], h [B,H,nC,M]) in float32 (float64 for float64 inputs)."""
    B, H, Tk, K = k.shape
    sd = state_dtype(k)
    Fs, hs = [], []
    for j in range(Tk // chunk_size):
        sl = slice(j * chunk_size, (j + 1) * chunk_size)
        Fs.append(torch.einsum("bhsk,bhsv->bhkv", k[:, :, sl].to(sd), v[:, :, sl].to(sd)))
        hs.append(hk[:, :, sl].to(sd).mean(2))
    if not Fs:
        return (k.new_zeros(B, H, 0, K, v.shape[-1], dtype=sd),
                k.new_zeros(B, H, 0, hk.shape[-1], dtype=sd))
    return torch.stack(Fs, 2), torch.stack(hs, 2)


def routing_weights_ref(scores, valid, top_k):
    """p = softmax over the valid candidates, restricted to the top_k highest valid scores.
    scores, valid [..., S]; rows with no valid candidate (all scores -inf) get all zeros."""
    scores = scores.masked_fill(~valid, float("-inf"))
    S = scores.shape[-1]
    if top_k is not None and top_k < S:
        kth = scores.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(valid).scatter(-1, kth, True)
        scores = scores.masked_fill(~keep, float("-inf"))
    any_valid = (scores != float("-inf")).any(-1, keepdim=True)
    p = scores.masked_fill(~any_valid, 0.0).softmax(-1)
    return torch.where(any_valid, p, torch.zeros_like(p))


def bsbr_attention_ref(q, k, v, r, hk, *, chunk_size, top_k=None, scale=None, offset=0,
                       bank_F=None, bank_h=None, return_slot_weights=False, long_scale=1.0):
    """out = local + long_scale · long (see the module docstring). Returns o
    [B,H,Tq,V] in v's dtype, and slot_weights [B,H,n] (Σ over queries of each bank slot's
    weight) if asked."""
    B, H, Tq, K = q.shape
    M = r.shape[-1]
    sd = state_dtype(q)
    local = chunk_local_attention_ref(q.to(sd), k.to(sd), v.to(sd), chunk_size=chunk_size,
                                      offset=offset, scale=scale)
    F, h = chunk_states_ref(k, v, hk, chunk_size=chunk_size)
    n = 0 if bank_F is None else bank_F.shape[2]
    if n:
        F = torch.cat([bank_F.to(sd), F.to(sd)], 2)
        h = torch.cat([bank_h.to(sd), h.to(sd)], 2)
    F, h = F.to(sd), h.to(sd)
    S = F.shape[2]
    # Candidates: every bank slot, and this call's chunks strictly before the query's chunk.
    c_q = (torch.arange(Tq, device=q.device) + offset) // chunk_size          # [Tq]
    j = torch.arange(S, device=q.device)
    valid = (j[None, :] < n) | ((j[None, :] - n) < c_q[:, None])              # [Tq, S]
    scores = torch.einsum("bhtm,bhjm->bhtj", r.to(sd), h) / math.sqrt(M)
    p = routing_weights_ref(scores, valid.expand_as(scores), top_k)           # [B,H,Tq,S]
    qF = torch.einsum("bhtk,bhjkv->bhtjv", q.to(sd), F)
    long = torch.einsum("bhtj,bhtjv->bhtv", p, qF) * long_scale
    o = (local + long).to(v.dtype)
    if return_slot_weights:
        return o, p[..., :n].sum(2).detach().to(sd)
    return o


def routed_readout_step_ref(q, r, bank_F, bank_h, top_k=None, long_scale=1.0):
    """One decode token reading the bank: q [B,H,K], r [B,H,M], bank_F [B,H,n,K,V],
    bank_h [B,H,n,M]. Returns (long_scale · long [B,H,V], slot_weights [B,H,n]) in float32
    (float64 for float64 inputs); every bank slot is a candidate."""
    sd = state_dtype(q)
    scores = torch.einsum("bhm,bhjm->bhj", r.to(sd), bank_h.to(sd)) / math.sqrt(r.shape[-1])
    p = routing_weights_ref(scores, torch.ones_like(scores, dtype=torch.bool), top_k)
    long = torch.einsum("bhj,bhk,bhjkv->bhv", p, q.to(sd), bank_F.to(sd)) * long_scale
    return long, p


def per_sequence(fn, cu_seqlens, *tensors, **kw):
    """The varlen contract read literally: ``fn`` on each sequence packed in ``tensors``
    ([1, H, total, ·], cut along time at the offsets cu_seqlens) alone, its outputs (a tensor
    or a tuple of them) concatenated along dim 2 (time, or the chunk axis of states)."""
    offsets = cu_seqlens.tolist()
    outs = [fn(*(t[:, :, a:b] for t in tensors), **kw) for a, b in zip(offsets, offsets[1:])]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, 2) for parts in zip(*outs))
    return torch.cat(outs, 2)

"""Public entry points of `kernels.bsbr`.

Backends:
  "auto"       Triton on CUDA (when it takes the inputs: not float64, chunk_size and head dims
               <= 256), else the blockwise PyTorch path (always on the CPU).
  "triton"     Triton kernels (local attention, chunk states, top-k routing for top_k <= 16,
               routed readout; fwd + bwd); dense routing and h in PyTorch. On the CPU only
               under TRITON_INTERPRET=1.
  "torch"      blockwise PyTorch: never builds a T×T matrix, and its memory follows T, not
               chunk_size (chunk_size >= T is exact softmax attention).
  "reference"  naive.py: dense masks, an oracle for short sequences.

Launches: ``launch`` is a `BSBRLaunch` (kernels/bsbr/launch.py) or None; the Triton backend
runs each stage at the launch given, or at the tuning cache's launch for this GPU and shape
class (the defaults without one). The other backends have no launch choices.

Layouts: ``layout`` "bhtk" (default) takes and returns per-token tensors [B,H,T,·]; "bthk"
[B,T,H,·] (layout.py: the Triton kernels read and write that memory in place, no transpose
copies). States (F, h, the bank) are [B,H,n,·] in both.

Packed sequences: ``cu_seqlens`` [N+1] (int32 / int64, on the inputs' device) packs N
sequences along time into one row (B = 1), as in fla; each is computed as if called alone,
from its first token (offset 0, no bank). varlen.py has the method (one chunk-aligned row: the
only change against one long sequence is a per-chunk lower bound in the routing). Reading the
offsets is a host sync; `chunk_states` then returns `VarlenStates`.

Non-finite inputs: a NaN or inf in an input gives NaN in exactly the output rows of the
float64 reference, for the routing inputs r, hk and bank_h and for q, on every backend. A slot
whose score r_t · h_j is NaN or +inf is a candidate of query t (it wins the top-k) and makes
t's routing weights NaN, so row t is NaN; a score of -inf is no candidate. So a NaN in hk_s
gives NaN in the rows t of later chunks (c(t) > c(s)) that may read chunk c(s); a NaN in r_t,
or an inf that meets a positive h_j, gives NaN in row t when t has a slot to read; a NaN in q_t
gives NaN in row t. A NaN or inf in k, v or bank_F also reaches the rows that share a product
with it under a zero weight (0 · NaN = NaN: its chunk's earlier rows in the local softmax, the
rows of a tile), which differs between backends: treat such a call's output as NaN.
"""
from __future__ import annotations

import torch

from . import naive
from .launch import check_launch, resolve, shape_classes
from .layout import check_layout, heads_first, to_caller
from .local_torch import chunk_local_attention_torch
from .readout_torch import routed_readout_torch
from .routing import bank_slot_weights, route
from .states import chunk_states_torch
from .validate import (check_bsbr_inputs, check_local_inputs, check_long_scale, check_packed,
                       check_states_inputs, check_step_inputs, check_triton_ok, in_layout,
                       resolve_backend)
from .varlen import VarlenStates, chunk_row, from_row, row_states, to_row


def _resolved(launch, kind, device, dtype, stages, **sizes):
    """The launch of each Triton stage in ``stages``; None off the Triton backend."""
    if kind != "triton":
        return None
    classes = shape_classes(dtype=dtype, **sizes)
    return resolve(launch, device, {s: classes[s] for s in stages})


def _packed_row(cu_seqlens, total, chunk_size):
    return None if cu_seqlens is None else chunk_row(cu_seqlens, total, chunk_size)


def _local(q, k, v, chunk_size, offset, scale, kind, launch, bthk):
    if kind == "triton":
        from .local_triton import chunk_local_attention_triton
        return chunk_local_attention_triton(q, k, v, chunk_size=chunk_size, offset=offset,
                                            scale=scale, launch=launch.local, bthk=bthk)
    if kind == "torch":
        return chunk_local_attention_torch(q, k, v, chunk_size=chunk_size, offset=offset,
                                           scale=scale)
    return naive.chunk_local_attention_ref(q, k, v, chunk_size=chunk_size, offset=offset,
                                           scale=scale)


def chunk_local_attention(q, k, v, *, chunk_size, offset=0, scale=None, cu_seqlens=None,
                          layout="bhtk", backend="auto", launch=None):
    """Softmax attention of query i over keys s <= offset + i of the same chunk (of size
    chunk_size, chunks aligned to the first key). q [B,H,Tq,K], k [B,H,offset+Tq,K],
    v [B,H,offset+Tq,V] (layout "bthk": [B,T,H,·]); scale (a finite number > 0) defaults to
    1/sqrt(K). cu_seqlens: packed sequences (see the module docstring), each with its own
    chunks. launch: a BSBRLaunch (its ``local`` stage) or None. Returns [B,H,Tq,V] in v's dtype
    and the inputs' layout; differentiable in q, k, v."""
    bthk = check_layout(layout)
    q, k, v = (heads_first(t, bthk) for t in (q, k, v))
    d = in_layout(bthk, check_local_inputs, q, k, v, chunk_size, offset, scale)
    check_packed(cu_seqlens, d, offset)
    launch = check_launch(launch)
    kind = resolve_backend(backend, q.device, q.dtype, chunk_size, (d.K, d.V))
    if kind == "triton":
        check_triton_ok(q, chunk_size, bthk=bthk, tensors=(q, k, v))
    row = _packed_row(cu_seqlens, d.Tk, chunk_size)
    if row is not None and kind == "reference":
        o = naive.per_sequence(naive.chunk_local_attention_ref, cu_seqlens, q, k, v,
                               chunk_size=chunk_size, scale=scale)
    elif row is not None:
        launch = _resolved(launch, kind, q.device, q.dtype, ("local",), T=row.rows, K=d.K,
                           V=d.V, chunk_size=chunk_size)
        o = from_row(_local(*(to_row(t, row) for t in (q, k, v)), chunk_size, 0, scale, kind,
                            launch, False), row, bthk)
    else:
        launch = _resolved(launch, kind, q.device, q.dtype, ("local",), T=d.Tk, K=d.K, V=d.V,
                           chunk_size=chunk_size)
        o = _local(q, k, v, chunk_size, offset, scale, kind, launch, bthk)
    return to_caller(o, bthk)


def _states(k, v, hk, chunk_size, kind, launch, bthk):
    if kind == "triton":
        from .states_triton import chunk_states_triton
        return chunk_states_triton(k, v, hk, chunk_size=chunk_size, launch=launch.states,
                                   bthk=bthk)
    if kind == "torch":
        return chunk_states_torch(k, v, hk, chunk_size=chunk_size)
    return naive.chunk_states_ref(k, v, hk, chunk_size=chunk_size)


def chunk_states(k, v, hk, *, chunk_size, cu_seqlens=None, layout="bhtk", backend="auto",
                 launch=None):
    """(F [B,H,nC,K,V], h [B,H,nC,M]) of the nC = T // chunk_size COMPLETE chunks:
    F_j = Σ_{s in j} k_sᵀ v_s, h_j = mean_{s in j} hk_s; float32 (float64 for float64 k).
    k [B,H,T,K], v [B,H,T,V], hk [B,H,T,M] (layout "bthk": [B,T,H,·]). With cu_seqlens, a
    `VarlenStates` (F, h, cu_chunks, tails): each packed sequence's complete chunks, packed
    along the chunk axis, and the lengths of their partial tails (varlen.py).
    Differentiable in k, v, hk. backend as in chunk_local_attention ("triton": F by a Triton
    kernel with float32 accumulation, for 16-bit inputs on the GPU); launch: a BSBRLaunch (its
    ``states`` stage) or None."""
    bthk = check_layout(layout)
    k, v, hk = (heads_first(t, bthk) for t in (k, v, hk))
    d = in_layout(bthk, check_states_inputs, k, v, hk, chunk_size)
    check_packed(cu_seqlens, d)
    launch = check_launch(launch)
    kind = resolve_backend(backend, k.device, k.dtype, 1, (d.K, d.V))
    if kind == "triton":
        check_triton_ok(k, 1, name="k", bthk=bthk, tensors=(k, v, hk))
    row = _packed_row(cu_seqlens, d.Tk, chunk_size)
    if row is None:
        launch = _resolved(launch, kind, k.device, k.dtype, ("states",), T=d.Tk, K=d.K, V=d.V,
                           chunk_size=chunk_size)
        return _states(k, v, hk, chunk_size, kind, launch, bthk)
    if kind == "reference":
        F, h = naive.per_sequence(naive.chunk_states_ref, cu_seqlens, k, v, hk,
                                  chunk_size=chunk_size)
        return VarlenStates(F, h, row.cu_chunks, row.tails)
    launch = _resolved(launch, kind, k.device, k.dtype, ("states",), T=row.rows, K=d.K, V=d.V,
                       chunk_size=chunk_size)
    F, h = _states(*(to_row(t, row) for t in (k, v, hk)), chunk_size, kind, launch, False)
    return row_states(F, h, row)


def _bsbr(q, k, v, r, hk, d, *, chunk_size, top_k, scale, offset, bank_F, bank_h, long_scale,
          kind, launch, bthk, slot_weights, row=None):
    """bsbr_attention on [B,H,T,·] views (the torch and Triton backends); row: the
    chunk-aligned row of packed sequences the inputs lie on. Returns (o, slot weights or
    None)."""
    sd = naive.state_dtype(q)
    local = _local(q, k, v, chunk_size, offset, scale, kind, launch, bthk)
    F, h = _states(k, v, hk, chunk_size, kind, launch, bthk)
    if d.n:
        F = torch.cat([bank_F.to(sd), F], 2)
        h = torch.cat([bank_h.to(sd), h], 2)
    packed = {} if row is None else dict(chunk_lo=row.chunk_lo,
                                         most_candidates=row.most_candidates)
    if F.shape[2] == 0 or packed.get("most_candidates") == 0:     # nothing to route to
        w = torch.zeros(d.B, d.H, d.n, dtype=sd, device=q.device) if slot_weights else None
        return local, w
    if kind == "triton":
        from .readout_triton import SharedInverseIndex, routed_readout_triton
        # One sort of the picks serves the readout and the routing backward.
        inverse = SharedInverseIndex()
        idx, p = route(r, h, n=d.n, offset=offset, chunk_size=chunk_size, top_k=top_k,
                       backend="triton", inverse=inverse, launch=launch.routing, bthk=bthk,
                       **packed)
        # λ rides on the routing weights and the add of local on the sum over the picks: one
        # pass writes o in v's dtype (and layout).
        o = routed_readout_triton(q, F, idx, p, launch.readout, local=local, scale=long_scale,
                                  inverse=inverse, bthk=bthk)
    else:
        idx, p = route(r, h, n=d.n, offset=offset, chunk_size=chunk_size, top_k=top_k,
                       **packed)
        # λ rides on the readout's query (q is [Tq, K] in the input dtype, the smallest
        # operand), never on the local softmax or the routing.
        q_long = q if long_scale == 1.0 else q * long_scale
        long = routed_readout_torch(q_long, F, idx, p)
        # In place: no float32 copy of local (at 32k, H16, D128 one pass of 268 MB fewer).
        o = long.add_(local).to(v.dtype)
    return o, bank_slot_weights(idx, p, d.n) if slot_weights else None


def bsbr_attention(q, k, v, r, hk, *, chunk_size, top_k=None, scale=None, offset=0,
                   bank_F=None, bank_h=None, return_slot_weights=False, long_scale=1.0,
                   cu_seqlens=None, layout="bhtk", backend="auto", launch=None):
    """Causal BSBR attention: out = local + long_scale · long (long = q Σ p F; the module
    docstring of naive.py has the math). q [B,H,Tq,K], k, v, hk [B,H,offset+Tq,·],
    r [B,H,Tq,M] (layout "bthk": [B,T,H,·]); bank_F [B,H,n,K,V], bank_h [B,H,n,M]. scale and
    long_scale: finite numbers > 0 (scale None: 1/sqrt(K)). cu_seqlens: packed sequences (see
    the module docstring). launch: a BSBRLaunch or None. Returns o [B,H,Tq,V] in v's dtype and
    the inputs' layout, or (o, slot_weights [B,H,n] float32, no grad) with
    return_slot_weights. Differentiable in q, k, v, r, hk, bank_F, bank_h."""
    bthk = check_layout(layout)
    q, k, v, r, hk = (heads_first(t, bthk) for t in (q, k, v, r, hk))
    d = in_layout(bthk, check_bsbr_inputs, q, k, v, r, hk, chunk_size, top_k, offset, bank_F,
                  bank_h, scale)
    check_packed(cu_seqlens, d, offset)
    long_scale = check_long_scale(long_scale)
    launch = check_launch(launch)
    kind = resolve_backend(backend, q.device, q.dtype, chunk_size, (d.K, d.V))
    if kind == "triton":
        check_triton_ok(q, chunk_size, bthk=bthk, tensors=(q, k, v, r, hk))
    row = _packed_row(cu_seqlens, d.Tk, chunk_size)
    kw = dict(chunk_size=chunk_size, top_k=top_k, scale=scale, long_scale=long_scale)
    if kind == "reference":
        args = dict(kw, offset=offset, bank_F=bank_F, bank_h=bank_h,
                    return_slot_weights=return_slot_weights)
        if row is None:
            out = naive.bsbr_attention_ref(q, k, v, r, hk, **args)
        else:
            out = naive.per_sequence(naive.bsbr_attention_ref, cu_seqlens, q, k, v, r, hk,
                                     **args)
        o, w = out if return_slot_weights else (out, None)
    else:
        launch = _resolved(launch, kind, q.device, q.dtype,
                           ("routing", "readout", "local", "states"),
                           T=d.Tk if row is None else row.rows, K=d.K, V=d.V, M=d.M,
                           chunk_size=chunk_size, top_k=top_k)
        kw.update(offset=offset, bank_F=bank_F, bank_h=bank_h, kind=kind, launch=launch,
                  slot_weights=return_slot_weights)
        if row is None:
            o, w = _bsbr(q, k, v, r, hk, d, bthk=bthk, **kw)
        else:
            o, w = _bsbr(*(to_row(t, row) for t in (q, k, v, r, hk)), d, bthk=False, row=row,
                         **kw)
            o = from_row(o, row, bthk)
    o = to_caller(o, bthk)
    return (o, w) if return_slot_weights else o


def routed_readout_step(q, r, bank_F, bank_h, top_k=None, long_scale=1.0):
    """One decode token reading the bank (every slot is a candidate). q [B,H,K], r [B,H,M],
    bank_F [B,H,n,K,V] float32, bank_h [B,H,n,M]. Returns (long_scale · q Σ p F [B,H,V],
    slot_weights [B,H,n]), both float32 (float64 for float64 q). PyTorch on any device; no host
    sync."""
    n = check_step_inputs(q, r, bank_F, bank_h, top_k)
    long_scale = check_long_scale(long_scale)
    sd = naive.state_dtype(q)
    B, H, K = q.shape
    V = bank_F.shape[-1]
    if n == 0:
        return q.new_zeros(B, H, V, dtype=sd), q.new_zeros(B, H, 0, dtype=sd)
    h = bank_h.to(sd)
    idx, p = route(r[:, :, None], h, n=n, offset=0, chunk_size=1, top_k=top_k)
    Fb = bank_F.to(sd)
    # Only the k selected states are read: gather them, then one small batched matvec.
    Fg = torch.gather(Fb, 2, idx[:, :, 0].clamp(min=0)[..., None, None].expand(-1, -1, -1, K, V))
    long = torch.einsum("bhj,bhk,bhjkv->bhv", p[:, :, 0], q.to(sd), Fg)
    if long_scale != 1.0:
        long = long * long_scale
    return long, bank_slot_weights(idx, p, n)

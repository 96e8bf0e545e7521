"""The autograd Function over the chunked Triton kernels (chunk_state.py, chunk_output.py,
chunk_grad.py), walking the sequence in segments so that memory stays bounded at any length.

Per-chunk states are K·V values each (8 MiB per head in float32 at BDH's K=8192, V=256), so the
whole sequence's chunk states are never held at once. The sequence is cut into segments of at
most SEGMENT_TOKENS tokens, sized so one segment's chunk-state buffer stays under
SEGMENT_BYTES. The forward carries the float32 state from segment to segment and saves only
the states at segment boundaries; the backward walks the segments in reverse, recomputes each
segment's chunk states from its boundary state, and carries dL/dS backwards the same way.

A packed varlen row (``offsets``, cu_seqlens on the host) is cut the same way over its chunks
(schedule.py): each sequence starts from its own initial state and ends in its own final
state, and only the one sequence that runs across a segment boundary carries a state over it,
so a boundary costs one [H, K, V] state however many sequences the row holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import chunk_grad, chunk_output, chunk_state
from ..launch import INTERPRET
from .common import bhtd
from .launches import ChunkLaunch
from .plan import default_chunk_launch, fused_needs_atomics, plan as make_plan
from .schedule import cut_sequences, dense_segments, varlen_segment

SEGMENT_TOKENS = 16384
MAX_GRID_BH = 65535              # B·H rides on a grid axis whose limit is 65535
SEGMENT_BYTES = 1 << 30          # per buffer (h in the forward; h and dh in the backward)


def _segment_tokens(B, H, K, V, elt, bts) -> int:
    """Tokens per segment: one buffer of chunk states (at the smaller chunk of ``bts``) stays
    under SEGMENT_BYTES; a multiple of every chunk in ``bts`` (the forward and the backward
    must cut the sequence at the same places, even with different chunk sizes)."""
    lo, hi = min(bts), max(bts)
    n = min(SEGMENT_TOKENS, max(1, SEGMENT_BYTES // (B * H * K * V * elt)) * lo)
    return max(hi, n // hi * hi)


def _log2_decay(decay):
    return None if decay is None else torch.log2(decay.detach().float()).contiguous()


@dataclass(frozen=True)
class Packing:
    """How a call's rows hold its sequences. bthk: the [B,T,H,·] layout; offsets: cu_seqlens on
    the host for one packed varlen row (None: a dense batch); final: whether a varlen call keeps
    its final states (a dense batch always forms them: the state is its carry)."""
    bthk: bool = False
    offsets: tuple[int, ...] | None = None
    final: bool = True


def _time(x, lo: int, hi: int, bthk: bool):
    """The view of tokens [lo, hi) of x in either layout."""
    return x[:, lo:hi] if bthk else x[:, :, lo:hi]


def _positions_and_lengths(T: int, rows: int, offsets, device):
    """Each token's position in its own sequence [T], and each state row's length [rows]."""
    t = torch.arange(T, device=device, dtype=torch.float64)
    if offsets is None:
        return t, torch.full((rows,), float(T), device=device, dtype=torch.float64)
    cu = torch.tensor(offsets, device=device, dtype=torch.float64)
    lengths = cu[1:] - cu[:-1]
    return t - torch.repeat_interleave(cu[:-1], lengths.long(), output_size=T), lengths


def _decay_grad(q, k, dq, dk, decay, final, dht, strict, packing):
    """dL/dγ [H] from the gradients the kernels already produced, without a kernel of its own.

    Every term of o_t and of S_final carries γ to the power (query index − key index): the
    query index is t (strict) or t+1 (inclusive) for o_t and T for S_final; the key index is
    s+1 for k_s and 0 for the initial state. Differentiating in a = log γ therefore weighs each
    term by that difference, and the sums over terms are exactly q_t·dL/dq_t, k_s·dL/dk_s and
    ⟨dL/dS_final, S_final⟩:

        dL/da = Σ_t i_q(t) (q_t · dq_t) − Σ_s (s+1) (k_s · dk_s) + T ⟨dS_final, S_final⟩

    and dL/dγ = (dL/da) / γ, with t, s and T each sequence's own (positions from its start, its
    length) in a packed varlen row. Sums over batch, time and K per head, accumulated in
    float64 (the two large sums nearly cancel)."""
    bthk = packing.bthk
    qdq = (q.float() * dq.float()).sum(-1).double()             # [B,H,T] or [B,T,H]
    kdk = (k.float() * dk.float()).sum(-1).double()
    if bthk:
        qdq, kdk = qdq.transpose(1, 2), kdk.transpose(1, 2)
    rows = q.shape[0] if packing.offsets is None else len(packing.offsets) - 1
    t, lengths = _positions_and_lengths(qdq.shape[2], rows, packing.offsets, q.device)
    da = ((t + (0.0 if strict else 1.0)) * qdq).sum((0, 2)) - ((t + 1.0) * kdk).sum((0, 2))
    if dht is not None and final is not None and dht.numel():
        da = da + (lengths[:, None] * (dht.double() * final.double()).sum((2, 3))).sum(0)
    return (da / decay.double()).to(decay.dtype)


def _forward_segment(q, k, v, o_acc, log2g, scale, strict, plan, tiles, seg, bthk, **states):
    """One segment of the forward: the fused kernel, or fwd_h then fwd_o. ``states``: h0, ht
    (and, varlen, the carries hc0, hct) as `chunk_state.chunk_fwd_h` takes them."""
    if plan.fused:
        chunk_output.chunk_fwd_fused(q, k, v, o_acc, log2g, states.pop("h0"), states.pop("ht"),
                                     scale, strict, seg=seg, tiles=tiles, bthk=bthk, **states)
        return
    h = chunk_state.chunk_fwd_h(k, v, log2g, seg=seg, tiles=tiles, bthk=bthk, **states)
    if seg.nts:
        chunk_output.chunk_fwd_o(q, k, v, h, o_acc, log2g, scale, strict, seg=seg, tiles=tiles,
                                 bthk=bthk)


def _backward_segment(q, k, v, do, dq, dk, dv, log2g, scale, strict, tiles, seg, bthk, h_states,
                      dh_states):
    """One segment of the backward: recompute its chunk states (``h_states`` as
    `chunk_state.chunk_fwd_h` takes them), pass dL/dS back through it (``dh_states`` as
    `chunk_state.chunk_bwd_dh` takes them), then dq, dk and dv of its chunks."""
    h = chunk_state.chunk_fwd_h(k, v, log2g, seg=seg, tiles=tiles, bthk=bthk, **h_states)
    dh = chunk_state.chunk_bwd_dh(q, do, log2g, scale=scale, strict=strict, seg=seg, tiles=tiles,
                                  bthk=bthk, **dh_states)
    if not seg.nts:
        return
    dA = chunk_grad.chunk_bwd_dA(v, do, log2g, scale, strict, seg=seg, tiles=tiles, bthk=bthk)
    chunk_grad.chunk_bwd_dqk(q, k, v, h, do, dh, dA, dq, dk, log2g, scale, strict, seg=seg,
                             tiles=tiles, bthk=bthk)
    del h, dA
    B, H, _, _ = bhtd(q, bthk)
    if bhtd(v, bthk)[1] == 1 and H > 1:
        # One v for all heads: per-head dv in float32 for this segment, summed over heads.
        n, V = seg.t_hi - seg.t_lo, v.shape[3]
        dv_h = torch.empty((B, n, H, V) if bthk else (B, H, n, V), dtype=torch.float32,
                           device=q.device)
        chunk_grad.chunk_bwd_dv(q, k, do, dh, dv_h, log2g, scale, strict, seg=seg,
                                t_dv=seg.t_lo, tiles=tiles, bthk=bthk)
        _time(dv, seg.t_lo, seg.t_hi, bthk).copy_(dv_h.sum(2 if bthk else 1, keepdim=True))
    else:
        chunk_grad.chunk_bwd_dv(q, k, do, dh, dv, log2g, scale, strict, seg=seg, t_dv=0,
                                tiles=tiles, bthk=bthk)


class HebbianAttentionFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, scale, strict, plan, packing):
        B, H, T, K = bhtd(q, packing.bthk)
        V = v.shape[3]
        log2g = _log2_decay(decay)
        tiles = plan.fwd_tiles(K, V)
        training = any(ctx.needs_input_grad)
        o = torch.empty((B, T, H, V) if packing.bthk else (B, H, T, V), dtype=v.dtype,
                        device=q.device)
        # The fused forward adds the K tiles' shares of O into a zeroed float32 buffer.
        o_acc = o
        if plan.fused and fused_needs_atomics(K, tiles):
            o_acc = torch.zeros(o.shape, dtype=torch.float32, device=q.device)
        run = (q, k, v, o_acc, log2g, scale, strict, plan, tiles)
        if packing.offsets is None:
            seg = _segment_tokens(B, H, K, V, q.element_size(), (plan.BT, plan.BT_bwd))
            state, boundaries = _forward_dense(run, initial_state, B, H, T, K, V, seg,
                                               packing.bthk, training)
            cuts = None
        else:
            seg = _segment_tokens(1, H, K, V, q.element_size(), (plan.BT, plan.BT_bwd))
            cuts = cut_sequences(packing.offsets, max(plan.BT, plan.BT_bwd), seg,
                                 MAX_GRID_BH // H)
            state, boundaries = _forward_varlen(run, initial_state, H, K, V, cuts, packing)
            if not packing.final:
                ctx.mark_non_differentiable(state)
        if o_acc is not o:
            o.copy_(o_acc)
            del o_acc
        if not training:
            boundaries = boundaries[:1]
        # The decay's gradient needs the final state (see `_decay_grad`).
        final = state if (ctx.needs_input_grad[3] and state.numel()) else None
        ctx.save_for_backward(q, k, v, log2g, decay, final, initial_state,
                              *[b for b in boundaries if b is not None])
        ctx.first_is_none = bool(boundaries) and boundaries[0] is None
        ctx.scale, ctx.strict, ctx.plan, ctx.seg = scale, strict, plan, seg
        ctx.packing, ctx.cuts = packing, cuts
        return o, state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, log2g, decay, final, initial_state, *saved = ctx.saved_tensors
        boundaries = ([None] if ctx.first_is_none else []) + list(saved)
        packing = ctx.packing
        B, H, T, K = bhtd(q, packing.bthk)
        V = v.shape[3]
        tiles = ctx.plan.bwd_tiles(K, V)
        do = do.contiguous() if do is not None else torch.zeros(
            (B, T, H, V) if packing.bthk else (B, H, T, V), dtype=v.dtype, device=q.device)
        if dht is not None and not dht.numel():
            dht = None                               # the placeholder of unkept final states
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        run = (q, k, v, do, dq, dk, dv, log2g, ctx.scale, ctx.strict, tiles)
        if packing.offsets is None:
            dh0 = _backward_dense(run, dht, boundaries, B, H, T, K, V, ctx.seg, ctx.plan.BT_bwd,
                                  packing.bthk)
            dh0 = dh0 if initial_state is not None else None
        else:
            dh0 = _backward_varlen(run, dht, initial_state, boundaries, H, K, V, ctx.cuts,
                                   ctx.plan.BT_bwd, packing.bthk)
        ddecay = None
        if ctx.needs_input_grad[3]:
            ddecay = _decay_grad(q, k, dq, dk, decay, final, dht, ctx.strict, packing)
        return dq, dk, dv, ddecay, dh0, None, None, None, None


def _forward_dense(run, initial_state, B, H, T, K, V, seg_tokens, bthk, training):
    """The dense forward: the [B, H, K, V] state carried over segments (in place without grad,
    never in the caller's initial_state). Returns (final state, the segments' start states)."""
    q, BT = run[0], run[7].BT
    state, boundaries = initial_state, []
    for seg in dense_segments(B, T, seg_tokens, BT):
        boundaries.append(state)
        # Each program reads its tile before it writes it, so the carry may be updated in place.
        reuse = not training and state is not None and state is not initial_state
        nxt = state if reuse else torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
        _forward_segment(*run, seg, bthk, h0=state, ht=nxt)
        state = nxt
    if T == 0:
        state = (initial_state.clone() if initial_state is not None
                 else torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device))
    return state, boundaries


def _forward_varlen(run, initial_state, H, K, V, cuts, packing):
    """The varlen forward: each sequence from its initial state to its final state, the carry
    [H, K, V] across segment boundaries. Returns (final states [N, H, K, V], or an empty
    placeholder when not kept; the segments' start carries, None for the first)."""
    q, BT = run[0], run[7].BT
    N = len(packing.offsets) - 1
    finals = torch.empty(N if packing.final else 0, H, K, V, dtype=torch.float32,
                         device=q.device)
    carries = [None]
    for pieces in cuts:
        seg = varlen_segment(pieces, BT, q.device)
        nxt = torch.empty(H, K, V, dtype=torch.float32, device=q.device)
        _forward_segment(*run, seg, packing.bthk, h0=initial_state,
                         ht=finals if packing.final else None, hc0=carries[-1], hct=nxt)
        carries.append(nxt)
    return finals, carries[:-1]


def _backward_dense(run, dht, boundaries, B, H, T, K, V, seg_tokens, BT, bthk):
    """The dense backward, segments in reverse; returns dL/d(initial state)."""
    q = run[0]
    # The reverse carry dL/dS, float32; updated in place segment by segment.
    dcarry = (dht.float().contiguous().clone() if dht is not None
              else torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device))
    segs = dense_segments(B, T, seg_tokens, BT)
    for seg, h0 in zip(reversed(segs), reversed(boundaries)):
        _backward_segment(*run, seg, bthk, h_states=dict(h0=h0),
                          dh_states=dict(dht=dcarry, dh0=dcarry))
    return dcarry


def _backward_varlen(run, dht, initial_state, boundaries, H, K, V, cuts, BT, bthk):
    """The varlen backward, segments in reverse, dL/dS carried back over segment boundaries;
    returns dL/d(initial states) [N, H, K, V], or None without an initial state."""
    q = run[0]
    dh0 = torch.empty_like(initial_state) if initial_state is not None else None
    dht = dht.float().contiguous() if dht is not None else None
    scratch = torch.empty(H, K, V, dtype=torch.float32, device=q.device)
    dcarry = None                              # dL/d(the carry the segment ends in)
    for pieces, hc0 in zip(reversed(cuts), reversed(boundaries)):
        seg = varlen_segment(pieces, BT, q.device)
        dnew = torch.empty(H, K, V, dtype=torch.float32, device=q.device)
        _backward_segment(*run, seg, bthk,
                          h_states=dict(h0=initial_state, hc0=hc0, hct=scratch),
                          dh_states=dict(dht=dht, dh0=dh0, dhct=dcarry, dhc0=dnew))
        dcarry = dnew
    return dh0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels run in. float64: float32 (Triton's float64 dots are slow where they
    exist at all). float16: float32, because per-chunk states and the carried state would pass
    float16's 65504 long before the scaled output does (use bf16 for speed). bfloat16 under
    TRITON_INTERPRET: float32, because the interpreter mis-loads bf16."""
    if dtype in (torch.float64, torch.float16):
        return torch.float32
    if dtype == torch.bfloat16 and INTERPRET:
        return torch.float32
    return dtype


def check_grid(B: int, H: int) -> None:
    if B * H > MAX_GRID_BH:
        raise ValueError(f"q: B·H = {B}·{H} = {B * H} exceeds the kernels' grid limit of "
                         f"{MAX_GRID_BH}; split the batch into pieces of at most "
                         f"{MAX_GRID_BH // H} rows")


def hebbian_attention_triton(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                             output_final_state=False, chunk_size=None,
                             launch: ChunkLaunch | None = None, offsets=None, bthk=False):
    """Chunked Hebbian attention on the Triton kernels. Inputs as `kernels.hebbian_attention`
    (already validated there), in the [B,H,T,·] layout or, ``bthk``, [B,T,H,·]; ``offsets``:
    cu_seqlens on the host for a packed varlen row (B = 1), else None. Returns (o in v's dtype
    and the inputs' layout, S [rows,H,K,V] float32 or None), rows B or, varlen, N.

    Inputs run in `_compute_dtype` (v is cast to it too), contiguous in their layout (a
    transposed view is copied once); o keeps v's dtype. ``launch`` sets the algorithm, chunks
    and tiles; by default `plan.default_chunk_launch` for the shape (a varlen row's sequences
    count as its batch: each is a walk of the state kernels).
    """
    out_dtype = v.dtype
    B, H, _, K = bhtd(q, bthk)
    rows = B if offsets is None else len(offsets) - 1
    check_grid(B, H)
    cd = _compute_dtype(q.dtype)
    qc = q.to(cd).contiguous()
    kc = qc if k is q else k.to(cd).contiguous()      # keep q is k (BDH): the kernels read it once
    vc = v.to(cd).contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    V = v.shape[3]
    launch = launch or default_chunk_launch(rows, H, K, V, cd, q.device)
    p = make_plan(rows, H, K, V, launch, chunk_size)
    packing = Packing(bthk=bool(bthk), offsets=None if offsets is None else tuple(offsets),
                      final=bool(output_final_state))
    o, S = HebbianAttentionFunction.apply(qc, kc, vc, decay, h0, float(scale), bool(strict), p,
                                          packing)
    return o.to(out_dtype), (S if output_final_state else None)

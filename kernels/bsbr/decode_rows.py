"""One decoded token per row of causal BSBR with the transformers drop-in's routing (r = q, the
meta key of a chunk the mean of its keys), every row at its own position, everything the step
reads or moves held on the device in fixed shapes: what a CUDA graph can replay.

The state of B rows (`RowsLayout` says how its slots are laid out):

    kbuf [B,H,C-1,K], vbuf [B,H,C-1,V]   the partial chunk (its first fill[b,h] tokens)
    fill [B,H] int32                     tokens in the partial chunk (one value per row, kept
                                         per head so that each (row, head) program owns its own)
    F [B,H,S,K,V], h [B,H,S,K], salience [B,H,S]   float32 slots
    counts [B,H,L+1] int32               counts[..., 0]: chunks folded into the archive (slot
                                         0); counts[..., 1+l]: slots used in level l's region

Slot 0 is the archive; level l owns the region of caps[l] slots starting at
1 + caps[l+1] + ... + caps[L-1] (the top level first, level 0 last: chronological order, as the
host bank `bsbr.bank` lists its slots); inside a region the used slots come first, oldest
first. The exact bank is one level that never merges (``bounded=False``, caps[0] its current
capacity, grown by the caller).

A step, for each row and head (the math of `bsbr.stream` for one token):
  1. o = softmax(scale · q·[kbuf[:fill], k]) [vbuf[:fill], v]         (local, its own chunk)
       + long_scale · q Σ_j p_j F_j,  p = softmax over the top_k used slots of q·h_j / √K;
  2. bounded bank: every used slot's salience ← decay · salience + p (the weight it got);
  3. the token joins the partial chunk; if that completes the chunk (fill = C - 1 before),
     the chunk's (Σ kᵀv, mean k) enters the bank (`bsbr.bank.push_chunks`, done per row with
     masks: level 0 full → its two oldest merge into level 1, ..., the top level full → its
     least salient slot folds into the archive) and fill returns to 0.
A row whose token is padding (``valid`` False) reads but changes nothing.

`rows_step_torch` is the readable form (the CPU path and the oracle); decode_rows_triton.py runs
the step in two launches (attend; advance) on the GPU.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..checks import check_decode_qkv, check_same_device
from .validate import BACKENDS, check_long_scale, check_top_k
from .validate import resolve_backend as resolve_bsbr_backend


@dataclasses.dataclass(frozen=True)
class RowsLayout:
    """Where a rows bank keeps its slots: caps[l] slots for level l (the exact bank: one level,
    ``bounded=False``); decay: the salience decay per token (bounded banks)."""
    caps: tuple
    bounded: bool = True
    decay: float = 1.0

    def __post_init__(self):
        caps = tuple(self.caps)
        object.__setattr__(self, "caps", caps)
        if not caps or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in caps):
            raise ValueError(f"caps: expected a non-empty tuple of ints >= 0, got {self.caps!r}")
        if self.bounded and (any(c < 2 for c in caps[:-1]) or caps[-1] < 1):
            raise ValueError(f"caps: a bounded bank needs >= 2 slots below the top level and "
                             f">= 1 at the top, got {caps}")
        if not self.bounded and len(caps) != 1:
            raise ValueError(f"caps: the exact bank is one level, got {caps}")
        if isinstance(self.decay, bool) or not 0.0 < float(self.decay) <= 1.0:
            raise ValueError(f"decay: expected a number in (0, 1], got {self.decay!r}")

    @property
    def levels(self) -> int:
        return len(self.caps)

    @property
    def slots(self) -> int:
        """S: the archive and every level's region."""
        return 1 + sum(self.caps)

    def start(self, level: int) -> int:
        """The first slot of ``level``'s region."""
        return 1 + sum(self.caps[level + 1:])


def check_rows_step(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout, valid, out):
    """Validate `bsbr_rows_step` inputs; returns (B, H, Hk, K, V, C)."""
    if not isinstance(layout, RowsLayout):
        raise TypeError(f"layout: expected a RowsLayout, got {type(layout).__name__}")
    B, H, Hk, K, V = check_decode_qkv(q, k, v)
    if not isinstance(kbuf, torch.Tensor) or kbuf.dim() != 4 or list(kbuf.shape[:2]) != [B, H] \
            or kbuf.shape[3] != K:
        raise ValueError(f"kbuf: expected [B,H,C-1,K] = [{B}, {H}, C-1, {K}], got "
                         f"{list(getattr(kbuf, 'shape', []))}")
    C = kbuf.shape[2] + 1
    S, L = layout.slots, layout.levels
    want = {"vbuf": (vbuf, [B, H, C - 1, V], None), "fill": (fill, [B, H], torch.int32),
            "F": (F, [B, H, S, K, V], torch.float32), "h": (h, [B, H, S, K], torch.float32),
            "salience": (salience, [B, H, S], torch.float32),
            "counts": (counts, [B, H, L + 1], torch.int32)}
    for name, (t, shape, dtype) in want.items():
        if not isinstance(t, torch.Tensor) or list(t.shape) != shape \
                or (dtype is not None and t.dtype != dtype) or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype or 'tensor'} {shape} (updated "
                             f"in place), got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{list(getattr(t, 'shape', []))}")
    if vbuf.dtype != kbuf.dtype or not kbuf.is_contiguous():
        raise ValueError(f"kbuf, vbuf: expected contiguous buffers of one dtype, got {kbuf.dtype} "
                         f"and {vbuf.dtype}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or list(valid.shape) != [B]):
        raise ValueError(f"valid: expected None or a bool tensor [B] = [{B}], got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} "
                         f"{list(getattr(valid, 'shape', []))}")
    if out is not None and (not isinstance(out, torch.Tensor) or list(out.shape) != [B, H, V]
                            or out.stride(-1) != 1):
        raise ValueError(f"out: expected None or a [B,H,V] = [{B}, {H}, {V}] tensor with unit "
                         f"last stride, got {list(getattr(out, 'shape', []))}")
    check_same_device(q=q, k=k, v=v, kbuf=kbuf, vbuf=vbuf, fill=fill, F=F, h=h,
                      salience=salience, counts=counts, valid=valid, out=out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, F, h)):
        raise ValueError("bsbr_rows_step updates the state in place and is not differentiable; "
                         "call it under torch.no_grad()")
    return B, H, Hk, K, V, C


def used_slots(counts: torch.Tensor, layout: RowsLayout) -> torch.Tensor:
    """[B,H,S] bool: the slots that hold a chunk (the archive once it has absorbed one)."""
    parts = [counts[..., :1] > 0]
    for lvl in range(layout.levels - 1, -1, -1):
        j = torch.arange(layout.caps[lvl], device=counts.device)
        parts.append(j < counts[..., 1 + lvl, None])
    return torch.cat(parts, -1)


def rows_step_torch(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout: RowsLayout, *,
                    scale, long_scale, top_k=None, valid=None):
    """The readable step (see the module docstring): the state updated in place, o [B,H,V]
    float32."""
    B, H, K = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    qf, kf, vf = q.float(), k.to(kbuf.dtype).float(), v.to(vbuf.dtype).float()
    C1 = kbuf.shape[2]
    f = fill.long()
    # 1. local softmax over the partial chunk's filled tokens and the token itself
    s_buf = torch.einsum("bhk,bhjk->bhj", qf, kbuf.float()) * scale
    s_buf = s_buf.masked_fill(torch.arange(C1, device=q.device) >= f[..., None], float("-inf"))
    p = torch.softmax(torch.cat([s_buf, (qf * kf).sum(-1, keepdim=True) * scale], -1), -1)
    o = torch.einsum("bhj,bhjv->bhv", p[..., :C1], vbuf.float()) + p[..., C1:] * vf
    #    routed readout of the used slots' top_k
    used = used_slots(counts, layout)
    S = used.shape[-1]
    scores = (torch.einsum("bhk,bhsk->bhs", qf, h) / math.sqrt(K)).masked_fill(~used, -math.inf)
    vals, idx = scores.topk(S if top_k is None else min(top_k, S), -1)
    kept = vals > -math.inf
    m = torch.where(kept, vals, 0.0).amax(-1, keepdim=True)
    e = torch.where(kept, torch.exp(vals - m), 0.0)
    w = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    F_picked = F.gather(2, idx[..., None, None].expand(-1, -1, -1, K, F.shape[-1]))
    o = o + long_scale * torch.einsum("bhj,bhk,bhjkv->bhv", w, qf, F_picked)
    real = torch.ones(B, 1, dtype=torch.bool, device=q.device) if valid is None \
        else valid[:, None]
    # 2. salience: decay, plus the weight each slot just received
    if layout.bounded:
        got = torch.zeros_like(salience).scatter_add_(-1, idx, w)
        salience.copy_(torch.where(used & real[..., None], salience * layout.decay + got,
                                   salience))
    # 3. the token joins the partial chunk; a completed chunk enters the bank
    done = real & (f == C1)
    write = (real & ~done)[..., None, None] & (torch.arange(C1, device=q.device)[:, None]
                                               == f[..., None, None])
    kbuf.copy_(torch.where(write, k.to(kbuf.dtype)[:, :, None], kbuf))
    vbuf.copy_(torch.where(write, v.to(vbuf.dtype)[:, :, None], vbuf))
    F_new = torch.einsum("bhjk,bhjv->bhkv", kbuf.float(), vbuf.float()) + kf[..., :, None] \
        * vf[..., None, :]
    h_new = (kbuf.float().sum(2) + kf) / (C1 + 1)
    push_rows_torch(F, h, salience, counts, F_new, h_new, done, layout)
    fill.copy_(torch.where(real, torch.where(done, 0, fill + 1), fill).to(fill.dtype))
    return o


def push_rows_torch(F, h, salience, counts, F_new, h_new, push, layout: RowsLayout) -> None:
    """Where ``push`` [B,H] holds, the chunk (F_new [B,H,K,V], h_new [B,H,K]) enters the bank
    (the rules of `bsbr.bank.push_chunks`), in place."""
    L, caps = layout.levels, layout.caps
    slots = [F, h, salience]
    # need[l]: a slot must enter level l and it is full (a level needs room only when the one
    # below it does; the exact bank's single level is never full: its caller grows it).
    need, cond = [], push
    for lvl in range(L):
        cond = cond & (counts[..., 1 + lvl] >= caps[lvl]) if layout.bounded else cond & False
        need.append(cond)

    def region(t, lvl):
        a = layout.start(lvl)
        return t.narrow(2, a, caps[lvl])

    def put(t, lvl, new, where):
        """Write ``new`` (one [B,H,cap,...] region) into level lvl's region where ``where``."""
        r = region(t, lvl)
        r.copy_(torch.where(where.view(*where.shape, *[1] * (r.dim() - 2)), new, r))

    def append(lvl, items, where):
        """Each tensor of ``items`` ([B,H,...] one slot) at its level's first free slot."""
        at = torch.arange(caps[lvl], device=F.device) == counts[..., 1 + lvl, None]   # [B,H,c]
        for t, item in zip(slots, items):
            r = region(t, lvl)
            hit = (at & where[..., None]).view(*at.shape, *[1] * (r.dim() - 3))
            r.copy_(torch.where(hit, item[:, :, None], r))
        counts[..., 1 + lvl] += where.to(counts.dtype)

    def shift_out(lvl, first, n, where):
        """Remove n slots of level lvl starting at slot ``first`` ([B,H] long), the rest moving
        down (zeros enter at the end)."""
        c = caps[lvl]
        j = torch.arange(c, device=F.device)
        src = j + n * (j >= first[..., None])                                     # [B,H,c]
        for t in slots:
            r = region(t, lvl)
            pad = torch.cat([r, torch.zeros_like(r[:, :, :n])], 2)
            index = src.view(*src.shape, *[1] * (r.dim() - 3)).expand(*src.shape, *r.shape[3:])
            put(t, lvl, pad.gather(2, index), where)
        counts[..., 1 + lvl] -= n * where.to(counts.dtype)

    if layout.bounded:
        top = L - 1
        # the top level's least salient slot (the oldest among ties) folds into the archive
        i = region(salience, top).argmin(-1)                                      # [B,H]
        pick = [region(t, top).gather(2, i.view(*i.shape, 1, *[1] * (t.dim() - 3)).expand(
            *i.shape, 1, *t.shape[3:]))[:, :, 0] for t in slots]
        arch = counts[..., 0].to(torch.float32)
        w = (arch / (arch + 2 ** top))[..., None]
        fold = need[top]
        merged = [F[:, :, 0] + pick[0], h[:, :, 0] * w + pick[1] * (1 - w),
                  salience[:, :, 0] + pick[2]]
        for t, new in zip(slots, merged):
            t[:, :, 0] = torch.where(fold.view(*fold.shape, *[1] * (new.dim() - 2)), new,
                                     t[:, :, 0])
        counts[..., 0] += (2 ** top) * fold.to(counts.dtype)
        shift_out(top, i, 1, fold)
        # below the top, from the top down: a full level's two oldest merge into the next
        for lvl in range(top - 1, -1, -1):
            two = [region(t, lvl) for t in slots]
            pair = [two[0][:, :, 0] + two[0][:, :, 1], (two[1][:, :, 0] + two[1][:, :, 1]) * 0.5,
                    two[2][:, :, 0] + two[2][:, :, 1]]
            append(lvl + 1, pair, need[lvl])
            shift_out(lvl, torch.zeros_like(i), 2, need[lvl])
    append(0, [F_new, h_new, torch.zeros_like(salience[:, :, 0])], push)


def bsbr_rows_step(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout: RowsLayout, *,
                   scale, long_scale=1.0, top_k=None, valid=None, out=None, backend="auto"):
    """One decoded token per row (see the module docstring). q [B,H,K]; k [B,Hk,K] and
    v [B,Hk,V] with Hk dividing H (grouped heads read in place; any strides with a unit last
    one); the state tensors as the module docstring lists them, updated in place; valid None or
    [B] bool. scale: the local softmax scale; long_scale: λ of the routed term. Writes
    o [B,H,V] in v's dtype into ``out`` (e.g. a view of the [B,1,H,V] attention output) or a
    new tensor and returns it. Nothing is read back to the host. backend "auto": Triton on
    CUDA, the PyTorch form elsewhere."""
    check_rows_step(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout, valid, out)
    check_top_k(top_k)
    scale, long_scale = check_long_scale(scale, "scale"), check_long_scale(long_scale)
    kind = resolve_bsbr_backend(backend, q.device)
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype, device=q.device)
    if kind == "triton":
        from .decode_rows_triton import rows_step_triton
        return rows_step_triton(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout,
                                scale=scale, long_scale=long_scale, top_k=top_k, valid=valid,
                                out=out)
    o = rows_step_torch(q, k, v, kbuf, vbuf, fill, F, h, salience, counts, layout, scale=scale,
                        long_scale=long_scale, top_k=top_k, valid=valid)
    return out.copy_(o)


__all__ = ["RowsLayout", "bsbr_rows_step", "rows_step_torch", "push_rows_torch", "used_slots",
           "check_rows_step", "BACKENDS"]

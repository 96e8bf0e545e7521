"""BSBR streaming, once: the outputs of new tokens after a `BSBRState`, and the state after them.

Every BSBR path runs through `bsbr_stream`: `BSBRAttention` (r and hk from its own
projections), the transformers attention function "bsbr" and `RecurrentMultiheadAttention`
(r = q, hk = k: no meta-key buffer in the state). For new tokens q, k, v [B,H,T,·] after a
state with ``fill`` tokens in its partial chunk and n completed-chunk slots in its bank:

  * output: one token is softmax attention over its partial chunk (`chunk_local_attention`)
    plus the routed readout of the bank (`routed_readout_step`): O(C + n) work, nothing before
    the partial chunk is re-run. More tokens are one `bsbr_attention` call over the partial
    chunk's keys followed by theirs, with the bank as extra completed chunks.
  * state: every slot's salience decays and gains the routing weight it just received
    (bounded bank only), the chunks this call completes enter the bank (`push_chunks`), and the
    rest becomes the new partial chunk.

``inplace=True`` writes the next state into the given one (its partial-chunk buffers, its
bounded bank's tensors, its position) instead of building a new one: what a cache does with
autograd off. Otherwise the given state is left as it was.

Rows (the transformers cache, `BSBRRows`: every row at its own position, r = q, hk = k):
`rows_prefill` runs B fresh rows' prompts (padded rows packed with cu_seqlens into one call,
their chunks entering each row's bank at once), `rows_step` one token per row (the fused
`kernels.bsbr.bsbr_rows_step`, nothing read back to the host), `rows_continue` several tokens
after a state (each row through `bsbr_stream`), `padded_rows_attention` a padded batch without
a state.
"""
from __future__ import annotations

import dataclasses

import torch

from kernels import bsbr as kb

from .bank import (bank_of_row, empty_bank, fresh_bank, push_chunks, rows_layout, rows_of_banks,
                   update_salience)
from .config import BankConfig
from .state import BSBRRows, BSBRState


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What a BSBR layer computes besides its inputs; validated by whoever builds it (the
    module constructors, the config readers). scale: the local softmax scale; long_scale: λ of
    the routed term, resolved (`bsbr.config.resolve_long_scale`); bank: None (exact) or the
    bounded bank's BankConfig; backend: a kernels.bsbr backend."""
    chunk_size: int
    scale: float
    long_scale: float
    top_k: int | None = None
    bank: BankConfig | None = None
    backend: str = "auto"


def empty_state(batch_size: int, n_head: int, K: int, V: int, M: int, spec: StreamSpec, *,
                device=None, dtype=torch.float32, meta_keys: bool = True,
                config: dict | None = None) -> BSBRState:
    """No history: an empty bank (a bounded one at its capacity already) in float32 (float64
    for float64 ``dtype``) and zeroed partial-chunk buffers in ``dtype``; no meta-key buffer
    without ``meta_keys`` (the meta key source is then the key)."""
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    bank = empty_bank(batch_size, n_head, K, V, M, spec.bank, device=device, dtype=sd)

    def buffer(width):
        return torch.zeros(batch_size, n_head, spec.chunk_size - 1, width, device=device,
                           dtype=dtype)

    return BSBRState(bank, buffer(K), buffer(V), buffer(M) if meta_keys else None, 0, config)


def bsbr_stream(q, k, v, state: BSBRState | None, spec: StreamSpec, *, r=None, hk=None,
           keep_state: bool = True, inplace: bool = False):
    """BSBR for new tokens q, k [B,H,T,K], v [B,H,T,V] (r [B,H,T,M], hk [B,H,T,M]; None: r = q,
    hk = k) after ``state`` (None: no history, only with keep_state=False).

    Returns (o [B,H,T,V] in v's dtype, the state after these tokens, or None without
    ``keep_state``)."""
    if state is None and keep_state:
        raise ValueError("state: stream needs a BSBRState to advance (see empty_state), got None")
    if state is not None and (hk is None) != (state.hk is None):
        raise ValueError(f"hk: the state {'has' if state.hk is not None else 'has no'} meta-key "
                         f"buffer, so hk must {'' if state.hk is not None else 'not '}be given")
    fill = 0 if state is None else state.fill
    k_all, v_all = _after_partial(state, "k", k, fill), _after_partial(state, "v", v, fill)
    hk_all = None if hk is None else _after_partial(state, "hk", hk, fill)
    bank_F = bank_h = None
    if state is not None:
        bank_F, bank_h, _ = state.bank.valid()
    want_weights = keep_state and spec.bank is not None and bank_F is not None
    o, weights = _attend(q, k_all, v_all, q if r is None else r, k_all if hk is None else hk_all,
                         fill, bank_F, bank_h, spec, want_weights)
    if not keep_state:
        return o, None
    return o, _advance(state, k_all, v_all, hk_all, q.shape[2], weights, spec, inplace)


def _after_partial(state, name: str, new: torch.Tensor, fill: int) -> torch.Tensor:
    """The partial chunk's filled tokens of buffer ``name``, then ``new``."""
    if not fill:
        return new
    return torch.cat([getattr(state, name)[:, :, :fill].to(new.dtype), new], 2)


def _attend(q, k, v, r, hk, fill, bank_F, bank_h, spec: StreamSpec, want_weights: bool):
    """(o [B,H,T,V], slot weights [B,H,n] or None); k, v, hk hold the partial chunk first."""
    C = spec.chunk_size
    if q.shape[2] == 1:
        # Decode: the token's chunk is the partial one and every completed chunk is in the bank.
        o = kb.chunk_local_attention(q, k, v, chunk_size=C, offset=fill, scale=spec.scale,
                                     backend=spec.backend)
        if bank_F is None:
            return o, None
        long, weights = kb.routed_readout_step(q[:, :, 0], r[:, :, 0], bank_F, bank_h,
                                               spec.top_k, long_scale=spec.long_scale)
        o = (o.to(long.dtype) + long.unsqueeze(2)).to(o.dtype)
        return o, (weights if want_weights else None)
    out = kb.bsbr_attention(q, k, v, r, hk, chunk_size=C, top_k=spec.top_k, scale=spec.scale,
                            offset=fill, bank_F=bank_F, bank_h=bank_h,
                            return_slot_weights=want_weights, long_scale=spec.long_scale,
                            backend=spec.backend)
    return out if want_weights else (out, None)


def _advance(state: BSBRState, k, v, hk, n_new: int, weights, spec: StreamSpec,
             inplace: bool) -> BSBRState:
    """The state after this call: salience updated, the completed chunks pushed into the bank,
    the rest kept as the partial chunk. k, v, hk (None: hk = k) hold the partial chunk's
    tokens, then this call's."""
    C = spec.chunk_size
    bank = update_salience(state.bank, weights, n_new, spec.bank)
    done = (k.shape[2] // C) * C                         # tokens in the chunks completed now
    if done:
        F_new, h_new = kb.chunk_states(k[:, :, :done], v[:, :, :done],
                                       (k if hk is None else hk)[:, :, :done], chunk_size=C,
                                       backend=spec.backend)
        bank = push_chunks(bank, F_new, h_new, spec.bank)
    rest = k.shape[2] - done
    pairs = [(state.k, k), (state.v, v)] + ([] if hk is None else [(state.hk, hk)])
    if inplace:
        state.bank.assign_(bank)
        start = 0 if done else state.fill                 # without a completed chunk, only
        for buf, t in pairs:                              # the new tokens are written
            buf[:, :, start:rest] = t[:, :, done + start:]
        state.position += n_new
        return state

    def keep(buf, t):
        tail = t[:, :, done:].to(buf.dtype)
        return torch.cat([tail, buf.new_zeros(*buf.shape[:2], C - 1 - rest, buf.shape[3])], 2)

    kept = [keep(buf, t) for buf, t in pairs]
    return BSBRState(bank, kept[0], kept[1], kept[2] if hk is not None else None,
                     state.position + n_new, None if state.config is None else dict(state.config))


# ----------------------------------------------------------------------------- rows

def rows_from(banks: list, kbufs: list, vbufs: list, fills: list, spec: StreamSpec,
              capacity: int = 0) -> BSBRRows:
    """A `BSBRRows` from one host state per row: its bank (`BankState`, batch 1), its partial
    chunk buffers ([1,H,C-1,·]) and fill. The exact bank's level gets at least ``capacity``
    slots. Out of place (differentiable in the inputs)."""
    if spec.bank is None:
        capacity = max([capacity] + [bank.n for bank in banks])
    layout = rows_layout(spec.bank, capacity)
    F, h, s, counts = rows_of_banks(banks, layout)
    H = F.shape[1]
    fill = torch.tensor(fills, dtype=torch.int32, device=F.device)[:, None].expand(-1, H)
    return BSBRRows(torch.cat(kbufs), torch.cat(vbufs), fill.contiguous(), F, h, s, counts,
                    layout, spec.bank)


def rows_grown(rows: BSBRRows, chunks: int) -> BSBRRows:
    """``rows`` with room for ``chunks`` slots in its exact bank (doubling, so a long decode
    reallocates O(log n) times); ``rows`` itself when it has it or is bounded."""
    have = rows.layout.caps[0]
    if rows.layout.bounded or chunks <= have:
        return rows
    extra = max(chunks, 2 * have) - have

    def more(t):          # the level's region is the last one: new slots go at the end
        return torch.cat([t, t.new_zeros(*t.shape[:2], extra, *t.shape[3:])], 2)

    return BSBRRows(rows.k, rows.v, rows.fill, more(rows.F), more(rows.h), more(rows.salience),
                    rows.counts, rows_layout(None, have + extra), None)


def rows_step(q, k, v, rows: BSBRRows, spec: StreamSpec, *, valid=None, out=None):
    """One token per row after ``rows`` (updated in place): q [B,H,K], k, v [B,Hk,·]. The
    drop-in's decode step, `kernels.bsbr.bsbr_rows_step`; returns o [B,H,V]."""
    return kb.bsbr_rows_step(q, k, v, rows.k, rows.v, rows.fill, rows.F, rows.h, rows.salience,
                             rows.counts, rows.layout, scale=spec.scale,
                             long_scale=spec.long_scale, top_k=spec.top_k, valid=valid, out=out,
                             backend=spec.backend)


def packed_rows(valid: torch.Tensor):
    """The real tokens of a padded batch, valid [B,T] bool: (their flat indices into B·T,
    cu_seqlens [B+1] int32, the row lengths on the host). One host read."""
    lengths = valid.sum(1)
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)
    return valid.reshape(-1).nonzero().squeeze(1), cu, lengths.tolist()


def _packed(x, index):
    """[B,H,T,D] → the real tokens packed token-major, [1,N,H,D]."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, H, D).index_select(0, index)[None]


def padded_rows_attention(q, k, v, valid, spec: StreamSpec):
    """BSBR of B independent rows of a padded batch (r = q, hk = k; no history), each row its
    own sequence of its real tokens (valid [B,T] bool, padding anywhere): the rows packed with
    cu_seqlens into one `bsbr_attention` call. Returns o [B,T,H,V] (token-major, zeros at the
    padding)."""
    B, H, T, _ = q.shape
    index, cu, _ = packed_rows(valid)
    qp, kp, vp = (_packed(t, index) for t in (q, k, v))
    o = kb.bsbr_attention(qp, kp, vp, qp, kp, chunk_size=spec.chunk_size, top_k=spec.top_k,
                          scale=spec.scale, long_scale=spec.long_scale, cu_seqlens=cu,
                          layout="bthk", backend=spec.backend)
    out = o.new_zeros(B * T, H, o.shape[-1]).index_copy(0, index, o[0])
    return out.view(B, T, H, -1)


def rows_prefill(q, k, v, spec: StreamSpec, valid=None):
    """The first tokens of B rows (no history): (o [B,T,H,V] token-major, the `BSBRRows` after
    them). Rows of different lengths (valid [B,T] bool) are packed into one call; each row's
    completed chunks enter its bank at once (`fresh_bank`), the rest becomes its partial
    chunk."""
    B, H, T, _ = q.shape
    C = spec.chunk_size
    if valid is None:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))       # the model's own memory
        o = kb.bsbr_attention(qt, kt, vt, qt, kt, chunk_size=C, top_k=spec.top_k,
                              scale=spec.scale, long_scale=spec.long_scale, layout="bthk",
                              backend=spec.backend)
        F, h = kb.chunk_states(kt, vt, kt, chunk_size=C, layout="bthk", backend=spec.backend)
        bank = fresh_bank(F, h, spec.bank)
        banks = [bank._map(lambda t, b=b: t[b:b + 1]) for b in range(B)]
        tails = [(k[b:b + 1, :, T - T % C:], v[b:b + 1, :, T - T % C:]) for b in range(B)]
    else:
        o = padded_rows_attention(q, k, v, valid, spec)
        index, cu, lengths = packed_rows(valid)
        kp, vp = _packed(k, index), _packed(v, index)
        states = kb.chunk_states(kp, vp, kp, chunk_size=C, cu_seqlens=cu, layout="bthk",
                                 backend=spec.backend)
        ends = states.cu_chunks.tolist()
        banks, tails, start = [], [], 0
        for b, n in enumerate(lengths):
            part = slice(ends[b], ends[b + 1])
            banks.append(fresh_bank(states.F[:, :, part], states.h[:, :, part], spec.bank))
            tail = slice(start + n - n % C, start + n)
            tails.append((kp[:, tail].transpose(1, 2), vp[:, tail].transpose(1, 2)))
            start += n
    kbufs, vbufs, fills = [], [], []
    for kt, vt in tails:
        fills.append(kt.shape[2])
        kbufs.append(_buffer(kt, C))
        vbufs.append(_buffer(vt, C))
    return o, rows_from(banks, kbufs, vbufs, fills, spec)


def _buffer(tail: torch.Tensor, C: int) -> torch.Tensor:
    """A partial chunk's tokens [1,H,f,D] in a zero-padded C - 1 token buffer."""
    return torch.cat([tail, tail.new_zeros(*tail.shape[:2], C - 1 - tail.shape[2],
                                           tail.shape[3])], 2)


def rows_continue(q, k, v, rows: BSBRRows, spec: StreamSpec, valid=None):
    """Several tokens per row after ``rows`` (whose rows may sit at different positions):
    each row through `bsbr_stream` on its real tokens (its state read on the host, one read).
    Returns (o [B,T,H,V] token-major, zeros at the padding; the new `BSBRRows`). Out of place
    (differentiable in q, k, v and the state)."""
    B, H, T, _ = q.shape
    counts, fills = rows.counts[:, 0].tolist(), rows.fill[:, 0].tolist()
    keep = None if valid is None else [row.nonzero().squeeze(1) for row in valid]
    outs, banks, kbufs, vbufs, new_fills = [], [], [], [], []
    for b in range(B):
        one = slice(b, b + 1)
        bank = bank_of_row(rows.F[one], rows.h[one], rows.salience[one], counts[b],
                           rows.layout, spec.bank)
        state = BSBRState(bank, rows.k[one], rows.v[one], None, fills[b])
        mine = [t[one] if keep is None else t[one].index_select(2, keep[b]) for t in (q, k, v)]
        if mine[0].shape[2]:
            o, state = bsbr_stream(*mine, state, spec)
        else:                                  # a row of padding only: nothing changes
            o = v.new_zeros(1, H, 0, v.shape[-1])
        full = o.new_zeros(1, H, T, o.shape[-1])
        outs.append(full.index_copy(2, keep[b], o) if keep is not None else o)
        banks.append(state.bank)
        kbufs.append(state.k)
        vbufs.append(state.v)
        new_fills.append(state.fill)
    capacity = rows.layout.caps[0] if spec.bank is None else 0
    return torch.cat(outs).transpose(1, 2), rows_from(banks, kbufs, vbufs, new_fills, spec,
                                                      capacity)


__all__ = ["StreamSpec", "empty_state", "bsbr_stream", "rows_from", "rows_grown", "rows_step",
           "rows_prefill", "rows_continue", "padded_rows_attention", "packed_rows"]

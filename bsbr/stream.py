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
"""
from __future__ import annotations

import dataclasses

import torch

from kernels import bsbr as kb

from .bank import empty_bank, push_chunks, update_salience
from .config import BankConfig
from .state import BSBRState


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


__all__ = ["StreamSpec", "empty_state", "bsbr_stream"]

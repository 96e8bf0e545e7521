"""BSBR attention inside Hugging Face transformers models, with a recurrent cache for `generate`.

    import bsbr.hf                           # registers "bsbr" (importing bsbr does it too)
    model.config.bsbr_chunk_size = 64
    model.set_attn_implementation("bsbr")
    bdh.hf.use_recurrent_cache(model)                 # generate() then keeps bank + partial chunk

The attention function gets q, k, v [B,H,T,D] after the model's own projections (and RoPE) and
returns [B,T,H,D]. It is causal BSBR (DESIGN.md "BSBR, made causal") on the model's own heads,
with parameter-free routing: the meta query is r = q and the meta key source is hk = k, so a
converted model gains no new weights:

    local_t = softmax(scaling · q_t·k_s) over s ≤ t in t's chunk     (the model's own `scaling`)
    long_t  = λ q_t Σ_j p_tj F_j,  F_j = Σ_{s∈j} k_sᵀ v_s,  p_t = softmax_j(q_t·mean_{s∈j} k_s / √D)
              over the completed chunks j before t's chunk (top_k of them if set)

Within one chunk this is exactly the model's softmax attention, so with chunk_size ≥ T a
converted model gives the original logits. λ (`bsbr_long_scale`) defaults to scaling / C, so a
routed chunk contributes the chunk-mean of (scaling · q_t·k_s) v_s: the size of one softmax
logit times a value, not C of them. With λ = 1 (DESIGN.md's plain formula) the unnormalised
sum over C keys swamps the local softmax of a converted model (measured on the byte-level GPT-2
of experiments.convert_gpt2, C = 16: val loss 2.58 → 4.88 right after conversion, 2.92 after the
fine-tune, against 2.59 and 2.51 with the default λ). λ is the kernels' `long_scale` argument
(it scales the routed term only, not the local softmax or the routing; the bank holds plain
F_j). Options, read from the model config:

    bsbr_chunk_size   C                                    default 64
    bsbr_top_k        routed chunks per token, None=all    default None
    bsbr_long_scale   λ, None = scaling / C                default None
    bsbr_backend      kernels.bsbr backend                 default "auto"
    bsbr_bank         None (exact bank) or slots per level default None
                      of the bounded bank, e.g. [8, 4, 4]

The recurrent cache (`bdh.hf.RecurrentStateLayer`) holds the bank of completed-chunk states
(F [B,H,n,D,D] float32, h [B,H,n,D]) and the keys/values of the current partial chunk (< C
tokens). By default the bank is exact and unbounded: it grows by one D×D slot per C tokens per
head, which is D/(2C) of a KV cache's growth. With `bsbr_bank` set it is the bounded
hierarchical bank of `bsbr.bank` (merges of the oldest slots, salience, an archive slot): the
cache then has one size at any length, and equals the exact bank while the completed chunks fit
in level 0. A prompt runs through the chunked kernel in one call; a decoded token runs
`chunk_local_attention` over its partial chunk plus `routed_readout_step` over the bank
(O(C + n) work, no re-run of the prefix).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from bdh.hf import (cache_layer_of, check_attention_call, compute_dtype, config_option,
                    expand_kv_heads, padding_free_mask)

from .config import check_long_scale, resolve_long_scale

BSBR = "bsbr"
DEFAULT_CHUNK_SIZE = 64


def bsbr_options(config) -> dict:
    C = config_option(config, "bsbr_chunk_size", DEFAULT_CHUNK_SIZE)
    if isinstance(C, bool) or not isinstance(C, int) or C < 1:
        raise ValueError(f"config.bsbr_chunk_size: expected an int >= 1, got {C!r}")
    top_k = getattr(config, "bsbr_top_k", None)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"config.bsbr_top_k: expected None or an int >= 1, got {top_k!r}")
    long_scale = getattr(config, "bsbr_long_scale", None)
    check_long_scale(long_scale, "config.bsbr_long_scale")
    return dict(chunk_size=C, top_k=top_k, backend=config_option(config, "bsbr_backend", "auto"),
                long_scale=long_scale, bank=bank_config(getattr(config, "bsbr_bank", None)))


def bank_config(spec):
    """config.bsbr_bank: None (the exact, growing bank) or the slots per level of the bounded
    hierarchical bank, e.g. [8, 4, 4] (a list, so the config stays JSON)."""
    if spec is None:
        return None
    from .config import BankConfig
    if isinstance(spec, BankConfig):
        return spec
    if not isinstance(spec, (list, tuple)) or not all(isinstance(n, int) and not
                                                      isinstance(n, bool) for n in spec):
        raise ValueError(f"config.bsbr_bank: expected None or a list of slots per level "
                         f"(e.g. [8, 4, 4]), got {spec!r}")
    return BankConfig(slots_per_level=tuple(spec))


def empty_stream(q, k, v, bank=None) -> dict:
    """A stream with no history: empty bank, empty partial chunk. With a bounded ``bank``
    (BankConfig) the bank tensors are allocated at its capacity at once, so the cache has one
    size from the first token on, plus the slots' salience, levels and chunk counts (int64
    [B, capacity], -1 past the valid slots: per batch row, so beam reordering indexes them like
    every other tensor)."""
    B, H, _, D = k.shape
    Dv = v.shape[-1]
    if bank is None:
        return {"bank_F": k.new_zeros(B, H, 0, D, Dv, dtype=torch.float32),
                "bank_h": k.new_zeros(B, H, 0, D, dtype=torch.float32),
                "keys": k[:, :, :0], "values": v[:, :, :0]}
    from .bank import empty_bank
    return _stream_of(empty_bank(B, H, D, Dv, D, bank, device=k.device), k[:, :, :0],
                      v[:, :, :0])


def _stream_of(bank, keys, values) -> dict:
    # The bank's layout (level and merge count of each slot) is the same in every row and
    # changes only on the host, so it rides as a tuple: reading it back from a device tensor
    # cost a host sync per layer and decode step.
    return {"bank_F": bank.F, "bank_h": bank.h, "bank_s": bank.salience,
            "bank_layout": (tuple(bank.levels), tuple(bank.counts)), "keys": keys,
            "values": values}


def _bank_of(stream):
    from .state import BankState
    levels, counts = stream["bank_layout"]
    return BankState(stream["bank_F"], stream["bank_h"], stream["bank_s"], levels, counts)


def bsbr_continue(q, k, v, stream: dict, *, chunk_size, top_k=None, scale=None, backend="auto",
                  long_scale=None, keep_state=True, bank=None):
    """Run BSBR for new tokens (q, k, v [B,H,T,D]) after `stream` (bank + partial chunk).
    ``bank``: None (exact: one slot per completed chunk) or the BankConfig of the bounded
    hierarchical bank (`bsbr.bank`: merges, salience, archive; constant size).

    Returns (o [B,H,T,D] in v's dtype, the stream after these tokens or None)."""
    from kernels.bsbr import (bsbr_attention, chunk_local_attention, chunk_states,
                              routed_readout_step)
    dtype = compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k_all = torch.cat([stream["keys"].to(dtype), k], dim=2)     # partial chunk, then the new keys
    v_all = torch.cat([stream["values"].to(dtype), v], dim=2)
    offset = stream["keys"].shape[2]
    bounded = bank is not None
    state_bank = _bank_of(stream) if bounded else None
    n = state_bank.n if bounded else stream["bank_F"].shape[2]
    bank_F, bank_h = stream["bank_F"][:, :, :n], stream["bank_h"][:, :, :n]
    has_bank = n > 0
    weights = None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    long_scale = resolve_long_scale(long_scale, scale, chunk_size)
    if q.shape[2] == 1 and not torch.is_grad_enabled():
        # Decoding one token: softmax over its partial chunk + the routed readout of the bank
        # (the query's own chunk is never complete, so the bank holds every candidate).
        o = chunk_local_attention(q, k_all, v_all, chunk_size=chunk_size, offset=offset,
                                  scale=scale, backend=backend)
        if has_bank:
            long, weights = routed_readout_step(q[:, :, 0], q[:, :, 0], bank_F,
                                                bank_h.to(dtype), top_k, long_scale=long_scale)
            o = (o.float() + long.unsqueeze(2)).to(v.dtype)
    else:
        o = bsbr_attention(q, k_all, v_all, q, k_all, chunk_size=chunk_size,
                           top_k=top_k, scale=scale, offset=offset, long_scale=long_scale,
                           bank_F=bank_F if has_bank else None,
                           bank_h=bank_h.to(dtype) if has_bank else None,
                           return_slot_weights=bounded and has_bank, backend=backend)
        if bounded and has_bank:
            o, weights = o
    if not keep_state:
        return o, None
    done = (k_all.shape[2] // chunk_size) * chunk_size          # tokens in chunks completed now
    F = h = None
    if done:
        F, h = chunk_states(k_all[:, :, :done], v_all[:, :, :done], k_all[:, :, :done],
                            chunk_size=chunk_size, backend=backend)
    if bounded:
        from .bank import push_chunks, update_salience
        new_bank = update_salience(state_bank, weights, q.shape[2], bank)
        if done:
            new_bank = push_chunks(new_bank, F.float(), h.float(), bank)
        return o, _stream_of(new_bank, k_all[:, :, done:], v_all[:, :, done:])
    if done:
        bank_F = torch.cat([bank_F, F.float()], dim=2)
        bank_h = torch.cat([bank_h, h.float()], dim=2)
    return o, {"bank_F": bank_F, "bank_h": bank_h,
               "keys": k_all[:, :, done:], "values": v_all[:, :, done:]}


def bsbr_attention_forward(module, query, key, value, attention_mask=None, scaling=None,
                           dropout=0.0, **kwargs):
    """transformers attention function "bsbr": q, k, v [B,H,T,D] → ([B,T,H,D], None)."""
    check_attention_call(module, query, key, attention_mask, BSBR)
    opts = bsbr_options(module.config)
    layer = cache_layer_of(key)
    key, value = expand_kv_heads(query, key, value)
    Tq = query.shape[2]
    if layer is not None and layer.state:
        stream = layer.state
    elif layer is None and key.shape[2] > Tq:
        # An ordinary KV cache: replay the history into a bank first (correct, O(context)).
        hist_k, hist_v = key[:, :, :-Tq], value[:, :, :-Tq]
        _, stream = bsbr_continue(hist_k, hist_k, hist_v,
                                  empty_stream(query, key, value, opts["bank"]),
                                  scale=scaling, **opts)
        key, value = key[:, :, -Tq:], value[:, :, -Tq:]
    else:
        stream = empty_stream(query, key, value, opts["bank"])
    o, stream = bsbr_continue(query, key, value, stream, scale=scaling,
                              keep_state=layer is not None, **opts)
    if layer is not None:
        layer.write_state(**stream)
    return o.to(value.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "bsbr" with transformers (idempotent; importing this module does it)."""
    AttentionInterface.register(BSBR, bsbr_attention_forward)
    AttentionMaskInterface.register(BSBR, padding_free_mask)


register()

__all__ = ["BSBR", "DEFAULT_CHUNK_SIZE", "bsbr_attention_forward", "bsbr_continue", "register"]

"""The transformers attention function "bsbr": causal BSBR on a model's own heads, with its
state in a `glassbrain.hf.RecurrentCache`.

    import bsbr                              # registers "bsbr"
    model.config.bsbr_chunk_size = 64
    model.set_attn_implementation("bsbr")
    glassbrain.hf.use_recurrent_cache(model)          # generate() then keeps bank + partial chunk

The function gets q, k, v [B,H,T,D] after the model's own projections (and RoPE) and returns
[B,T,H,D]. Routing is parameter-free: the meta query is r = q and the meta key source is hk = k,
so a converted model gains no new weights:

    local_t = softmax(scaling · q_t·k_s) over s ≤ t in t's chunk     (the model's own `scaling`)
    long_t  = λ q_t Σ_j p_tj F_j,  F_j = Σ_{s∈j} k_sᵀ v_s,  p_t = softmax_j(q_t·mean_{s∈j} k_s / √D)
              over the completed chunks j before t's chunk (top_k of them if set)

Within one chunk this is exactly the model's softmax attention, so with chunk_size ≥ T a
converted model gives the original logits. λ (`bsbr_long_scale`) defaults to scaling / C, so a
routed chunk contributes the chunk-mean of (scaling · q_t·k_s) v_s: the size of one softmax
logit times a value, not C of them. With λ = 1 the unnormalised sum over C keys swamps the
local softmax of a converted model (measured on the byte-level GPT-2 of
experiments.convert_gpt2, C = 16: val loss 2.58 → 4.88 right after conversion, 2.92 after the
fine-tune, against 2.59 and 2.51 with the default λ). λ scales the routed term only, not the
local softmax or the routing; the bank holds plain F_j. Options, read from the model config
(`BSBROptions`; each error names ``config.bsbr_<option>``):

    bsbr_chunk_size   C, an int >= 1                       default 64
    bsbr_top_k        routed chunks per token, None = all  default None
    bsbr_long_scale   λ, None = scaling / C                default None
    bsbr_backend      a kernels.bsbr backend               default "auto"
    bsbr_bank         None (exact bank) or slots per level default None
                      of the bounded bank, e.g. [8, 4, 4]

The cache layer holds a `BSBRRows` (no meta-key buffer: hk = k): per row of the batch, the bank
of completed-chunk states and the keys/values of the current partial chunk (< C tokens), every
per-row count (tokens in the partial chunk, slots used per level) on the device. By default the
bank is exact and unbounded: it grows by one D×D slot per C tokens per head, which is D/(2C) of
a KV cache's growth. With `bsbr_bank` set it is the bounded hierarchical bank of `bsbr.bank`:
the cache then has one size at any length (so a decode step can be replayed from a CUDA graph,
`glassbrain.hf.graph`), and equals the exact bank while the completed chunks fit in level 0.
A prompt runs through the chunked kernel in one call, its completed chunks entering the bank
at once (`bsbr.bank.fresh_bank`); a decoded token is `kernels.bsbr.bsbr_rows_step` (two
launches: local attention over the partial chunk plus the routed readout of the bank, then the
token into the partial chunk or a completed chunk into the bank; O(C + slots) work, no re-run
of the prefix). Several tokens after an existing state run each row through `bsbr.stream`.

Padding (a 2-D attention mask, left or right): each row is its own sequence of its real tokens,
with its own chunk grid. A prompt packs the rows' real tokens into one `bsbr_attention` call
(cu_seqlens); a padded decode token leaves its row unchanged. Each row is exactly what it is
alone.

Without a recurrent cache (an ordinary KV cache) the history is replayed into a bank on every
call: correct for the exact bank, O(context) work per token.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from glassbrain.checks import check_int, check_optional_int
from glassbrain.hf import (cache_layer, check_attention_call, compute_dtype, config_options,
                           expand_kv_heads, padding_mask)
from kernels.bsbr import BACKENDS
from kernels.bsbr.validate import TRITON_MAX_CHUNK

from .config import BankConfig, check_long_scale, resolve_long_scale
from .state import BSBRRows, BSBRState
from .stream import (StreamSpec, bsbr_stream, empty_state, padded_rows_attention, rows_continue,
                     rows_grown, rows_prefill, rows_step)

BSBR = "bsbr"
DEFAULT_CHUNK_SIZE = 64


def bank_config(spec, name: str = "config.bsbr_bank") -> BankConfig | None:
    """None (the exact, growing bank), a BankConfig, or the slots per level of the bounded
    hierarchical bank, e.g. [8, 4, 4] (a list, so the config stays JSON)."""
    if spec is None or isinstance(spec, BankConfig):
        return spec
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"{name}: expected None or a list of slots per level (e.g. [8, 4, 4]), "
                         f"got {spec!r}")
    try:
        return BankConfig(slots_per_level=tuple(spec))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class BSBROptions:
    """What the "bsbr" function reads from a model config (``config.bsbr_<field>``)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    top_k: int | None = None
    long_scale: float | None = None
    backend: str = "auto"
    bank: object = None
    PREFIX: ClassVar[str] = "bsbr_"

    def __post_init__(self):
        name = f"config.{self.PREFIX}"
        check_int(name + "chunk_size", self.chunk_size, 1)
        check_optional_int(name + "top_k", self.top_k, 1)
        check_long_scale(self.long_scale, name + "long_scale")
        if self.backend not in BACKENDS:
            raise ValueError(f"{name}backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "triton" and self.chunk_size > TRITON_MAX_CHUNK:
            raise ValueError(f"{name}chunk_size: the 'triton' backend takes chunks of at most "
                             f"{TRITON_MAX_CHUNK}, got {self.chunk_size}")
        object.__setattr__(self, "bank", bank_config(self.bank, name + "bank"))

    @classmethod
    def from_config(cls, config, overrides=None) -> "BSBROptions":
        return config_options(cls, config, cls.PREFIX, overrides)

    def spec(self, scale: float) -> StreamSpec:
        """The stream of a layer whose local softmax scale is ``scale``."""
        return StreamSpec(self.chunk_size, scale,
                          resolve_long_scale(self.long_scale, scale, self.chunk_size),
                          self.top_k, self.bank, self.backend)


def bsbr_attention_forward(module, query, key, value, attention_mask=None, scaling=None,
                           dropout=0.0, **kwargs):
    """transformers attention function "bsbr": q, k, v [B,H,T,D] → ([B,T,H,D], None)."""
    valid = check_attention_call(module, query, key, attention_mask, BSBR, kwargs)
    opts = BSBROptions.from_config(module.config)
    layer = cache_layer(module, kwargs)
    spec = opts.spec(query.shape[-1] ** -0.5 if scaling is None else scaling)
    if layer is not None and layer.state is not None and query.shape[2] == 1 \
            and not torch.is_grad_enabled():
        return _decode_step(query, key, value, layer, spec, valid), None
    key, value_h = expand_kv_heads(query, key, value)
    dtype = compute_dtype(query, key, value_h)
    q, k, v = query.to(dtype), key.to(dtype), value_h.to(dtype)
    Tq = q.shape[2]
    if layer is not None:
        rows = _checked_rows(layer, q, v)
        new_valid = None if valid is None else valid[:, -Tq:]
        if rows is None:
            o, rows = rows_prefill(q, k, v, spec, new_valid)
        else:
            o, new = rows_continue(q, k, v, rows, spec, new_valid)
            if torch.is_grad_enabled():
                rows = new
            else:                   # in place: the cache keeps its tensors while they fit
                rows.assign_(new)
        layer.write_state(rows)
    elif valid is not None:
        # No recurrent state (an ordinary KV cache, or none): every row runs from its first
        # real token; queries for the history's positions are computed and dropped.
        q_all = torch.cat([q.new_zeros(*q.shape[:2], k.shape[2] - Tq, q.shape[3]), q], 2)
        o = padded_rows_attention(q_all, k, v, valid, spec)[:, -Tq:]
    else:
        state = None
        if k.shape[2] > Tq:
            # An ordinary KV cache: replay the history into a bank first.
            hist_k, hist_v = k[:, :, :-Tq], v[:, :, :-Tq]
            _, state = bsbr_stream(hist_k, hist_k, hist_v, _empty(k, v, spec), spec)
            k, v = k[:, :, -Tq:], v[:, :, -Tq:]
        o, _ = bsbr_stream(q, k, v, state, spec, keep_state=False)
        o = o.transpose(1, 2)
    return o.to(value.dtype).contiguous(), None


def _empty(k, v, spec: StreamSpec) -> BSBRState:
    B, H, _, D = k.shape
    return empty_state(B, H, D, v.shape[-1], D, spec, device=k.device, dtype=k.dtype,
                       meta_keys=False)


def _checked_rows(layer, q, v) -> BSBRRows | None:
    """The layer's `BSBRRows` (None before its first call), refused if it belongs to another
    attention, batch or head shape."""
    rows = layer.state
    if rows is None:
        return None
    B, H, _, K = q.shape
    if not isinstance(rows, BSBRRows) or rows.k.shape[:2] != (B, H) or rows.k.shape[3] != K \
            or rows.v.shape[3] != v.shape[-1]:
        raise ValueError(f"cache: layer {layer.layer_idx} holds a state of another attention or "
                         f"batch ({type(rows).__name__}), not the BSBR rows of a [{B}, {H}, T, "
                         f"{K}] call; use a fresh RecurrentCache")
    return rows


def _decode_step(query, key, value, layer, spec: StreamSpec, valid) -> torch.Tensor:
    """One token per row: `bsbr.stream.rows_step` (grouped key/value heads read in place, o
    written straight into the [B,1,H,V] layout the model reshapes), the state in place. An
    exact bank first grows (on the host count of tokens seen, no device read) when a chunk
    could complete beyond its capacity."""
    rows = _checked_rows(layer, query, value)
    B, H, _, _ = query.shape
    if not rows.layout.bounded:
        grown = rows_grown(rows, layer.get_seq_length() // rows.chunk_size)
        if grown is not rows:
            rows.assign_(grown)
    out = torch.empty(B, 1, H, value.shape[-1], dtype=value.dtype, device=value.device)
    rows_step(query[:, :, 0], key[:, :, 0], value[:, :, 0], rows, spec,
              valid=None if valid is None else valid[:, -1], out=out[:, 0])
    layer.write_state(rows)
    return out


def register() -> None:
    """Register "bsbr" with transformers (idempotent; importing bsbr does it)."""
    AttentionInterface.register(BSBR, bsbr_attention_forward)
    AttentionMaskInterface.register(BSBR, padding_mask)


register()

__all__ = ["BSBR", "DEFAULT_CHUNK_SIZE", "BSBROptions", "bank_config", "bsbr_attention_forward",
           "register"]

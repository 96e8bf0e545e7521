"""The transformers attention function "hebbian": normalised linear attention on the Hebbian
kernels, with its state in a `RecurrentCache`.

    import glassbrain.hf                     # registers "hebbian" (importing bdh or bsbr does too)
    model.set_attn_implementation("hebbian")          # any GPT-2 / Llama-style model
    glassbrain.hf.use_recurrent_cache(model)          # generate() then keeps a fixed-size state

The function gets q, k, v [B,H,T,D] after the model's own projections (and RoPE) and returns
[B,T,H,D]. It is `kernels.normalised_hebbian_attention`, inclusive (a token sees itself, as
softmax attention does, so converted softmax weights keep their meaning):

    o_t = φ(q_t) Σ_{s≤t} φ(k_s)ᵀ v_s / (φ(q_t)·Σ_{s≤t} φ(k_s) + eps)

φ acts on the raw q and k: the model's softmax `scaling` would cancel in the ratio anyway. The
model's attention dropout is not applied (there is no weight matrix to drop from). Options,
read from the model config (set them with `bsbr.convert` or by hand; `HebbianOptions`):

    hebbian_feature_map  "elu" | "relu"                          default "elu"
    hebbian_eps          denominator guard, a finite number > 0   default 1e-6
    hebbian_chunk_size   None or a kernel chunk (2^n in [16, 128]) default None
    hebbian_backend      a kernels.hebbian backend                default "auto"

With a `RecurrentCache` the layer holds S' [B,H,D,D+1] float32 (the normaliser in the last
column): a prompt runs the chunked kernel, a decoded token one fused launch
(`kernels.hebbian.normalised_hebbian_step`) that updates S' in place, so its address is fixed
for the life of the cache and a CUDA graph can replay the step (`glassbrain.hf.graph`). With an
ordinary KV cache the past keys are folded into a state on every call (correct, but O(context)
work per token, like softmax attention).

Padding (a 2-D attention mask, left or right): a padded token's key becomes -inf, so
φ(k) = 0 and it adds nothing to the state or to any output. Each row is exactly what it is
alone; nothing is read back to the host.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kernels import check_normalised_options, normalised_hebbian_attention
from kernels.hebbian import normalised_hebbian_step

from .cache import cache_layer
from .checks import (check_attention_call, compute_dtype, config_options, expand_kv_heads,
                     padding_mask)

HEBBIAN = "hebbian"


@dataclasses.dataclass(frozen=True)
class HebbianOptions:
    """What the "hebbian" function reads from a model config (``config.hebbian_<field>``)."""
    feature_map: str = "elu"
    eps: float = 1e-6
    chunk_size: int | None = None
    backend: str = "auto"
    PREFIX: ClassVar[str] = "hebbian_"

    def __post_init__(self):
        check_normalised_options(self.feature_map, self.eps, self.chunk_size, self.backend,
                                 prefix=f"config.{self.PREFIX}")

    @classmethod
    def from_config(cls, config, overrides=None) -> "HebbianOptions":
        return config_options(cls, config, cls.PREFIX, overrides)

    def kernel_args(self) -> dict:
        return dataclasses.asdict(self)


def hebbian_attention_forward(module, query, key, value, attention_mask=None, scaling=None,
                              dropout=0.0, **kwargs):
    """transformers attention function "hebbian": q, k, v [B,H,T,D] → ([B,T,H,D], None)."""
    valid = check_attention_call(module, query, key, attention_mask, HEBBIAN, kwargs)
    opts = HebbianOptions.from_config(module.config)
    layer = cache_layer(module, kwargs)
    if valid is not None:
        # A padded token's key is -inf, so φ(k) = 0: it adds nothing to any state or output.
        key = key.masked_fill(~valid[:, None, :, None], float("-inf"))
    if layer is not None and layer.state is not None and query.shape[2] == 1 \
            and not torch.is_grad_enabled():
        return _decode_step(query, key, value, layer, opts), None
    key, value_h = expand_kv_heads(query, key, value)
    dtype = compute_dtype(query, key, value_h)
    q, k, v = query.to(dtype), key.to(dtype), value_h.to(dtype)
    Tq = q.shape[2]
    args = opts.kernel_args()
    if layer is not None:
        S = _checked_state(layer, q.shape[:2], q.shape[-1], v.shape[-1])
        # In place while autograd is off: the cache keeps one S' buffer for the whole sequence.
        o, S = normalised_hebbian_attention(q, k, v, S, output_final_state=True,
                                            inplace=S is not None and not torch.is_grad_enabled(),
                                            **args)
        layer.write_state(S)
    else:
        S = None
        if k.shape[2] > Tq:
            # An ordinary KV cache: the keys before this call's queries are the history.
            hist_k, hist_v = k[:, :, :-Tq], v[:, :, :-Tq]
            _, S = normalised_hebbian_attention(hist_k, hist_k, hist_v, None,
                                                output_final_state=True, **args)
            k, v = k[:, :, -Tq:], v[:, :, -Tq:]
        o, _ = normalised_hebbian_attention(q, k, v, S, **args)
    return o.to(value.dtype).transpose(1, 2).contiguous(), None


def _checked_state(layer, BH, K: int, V: int):
    """The layer's S' (None before its first call), refused if it is not [B,H,K,V+1]."""
    S = layer.state
    want = (*BH, K, V + 1)
    if S is not None and (not isinstance(S, torch.Tensor) or tuple(S.shape) != want):
        raise ValueError(f"cache: layer {layer.layer_idx} holds a state for another attention or "
                         f"batch ({type(S).__name__} {list(getattr(S, 'shape', []))}), not S' "
                         f"{list(want)}; use a fresh RecurrentCache")
    return S


def _decode_step(query, key, value, layer, opts: HebbianOptions) -> torch.Tensor:
    """One token per row with the cache's S': one fused launch (`normalised_hebbian_step`),
    which reads grouped key/value heads in place and writes o straight into the [B,1,H,V]
    layout the model reshapes, S' updated in place (its address never changes)."""
    B, H, _, K = query.shape
    V = value.shape[-1]
    S = _checked_state(layer, (B, H), K, V)
    out = torch.empty(B, 1, H, V, dtype=value.dtype, device=value.device)
    normalised_hebbian_step(query[:, :, 0], key[:, :, 0], value[:, :, 0], S,
                            feature_map=opts.feature_map, eps=opts.eps, backend=opts.backend,
                            out=out[:, 0])
    layer.write_state(S)
    return out


def register() -> None:
    """Register "hebbian" with transformers (idempotent; importing glassbrain.hf does it)."""
    AttentionInterface.register(HEBBIAN, hebbian_attention_forward)
    AttentionMaskInterface.register(HEBBIAN, padding_mask)


register()

__all__ = ["HEBBIAN", "HebbianOptions", "hebbian_attention_forward", "register"]

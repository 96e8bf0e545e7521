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
column): a prompt runs the chunked kernel, a decoded token the step kernel, which updates S' in
place. With an ordinary KV cache the past keys are folded into a state on every call (correct,
but O(context) work per token, like softmax attention).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kernels import check_normalised_options, normalised_hebbian_attention

from .cache import cache_layer
from .checks import (check_attention_call, compute_dtype, config_options, expand_kv_heads,
                     padding_free_mask)

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
    check_attention_call(module, query, key, attention_mask, HEBBIAN, kwargs)
    opts = HebbianOptions.from_config(module.config).kernel_args()
    layer = cache_layer(module, kwargs)
    key, value = expand_kv_heads(query, key, value)
    dtype = compute_dtype(query, key, value)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    B, H, Tq, D = q.shape
    if layer is not None:
        S = layer.state
        if S is not None and (not isinstance(S, torch.Tensor)
                              or S.shape != (B, H, D, v.shape[-1] + 1)):
            raise ValueError(f"cache: layer {layer.layer_idx} holds a state for another "
                             f"attention or batch ({type(S).__name__}), not S' "
                             f"[{B}, {H}, {D}, {v.shape[-1] + 1}]; use a fresh RecurrentCache")
        # In place while autograd is off: the cache keeps one S' buffer for the whole sequence.
        o, S = normalised_hebbian_attention(q, k, v, S, output_final_state=True,
                                            inplace=S is not None and not torch.is_grad_enabled(),
                                            **opts)
        layer.write_state(S)
    else:
        S = None
        if k.shape[2] > Tq:
            # An ordinary KV cache: the keys before this call's queries are the history.
            hist_k, hist_v = k[:, :, :-Tq], v[:, :, :-Tq]
            _, S = normalised_hebbian_attention(hist_k, hist_k, hist_v, None,
                                                output_final_state=True, **opts)
            k, v = k[:, :, -Tq:], v[:, :, -Tq:]
        o, _ = normalised_hebbian_attention(q, k, v, S, **opts)
    return o.to(value.dtype).transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "hebbian" with transformers (idempotent; importing glassbrain.hf does it)."""
    AttentionInterface.register(HEBBIAN, hebbian_attention_forward)
    AttentionMaskInterface.register(HEBBIAN, padding_free_mask)


register()

__all__ = ["HEBBIAN", "HebbianOptions", "hebbian_attention_forward", "register"]

"""What every recurrent attention function inside a transformers model checks and shares: the
mask function that hands the model's padding to the attention instead of a [T,T] mask, the
refusal of what a causal recurrent state cannot compute, grouped key/value heads, the kernels'
dtype, and options read from the model config (each error names ``config.<option>``)."""
from __future__ import annotations

import dataclasses

import torch
from transformers.masking_utils import causal_mask_function


@dataclasses.dataclass(frozen=True)
class PaddingMask:
    """Which tokens are real: ``valid`` [B, L] bool over the last L tokens a call's keys cover
    (the model's 2-D attention mask, as `padding_mask` hands it to the attention function in
    place of a [B,1,Tq,Tk] mask). A recurrent attention zeroes the padded tokens' share of its
    state, so every row computes what it computes alone; no value is read back to the host."""
    valid: torch.Tensor

    def keys(self, Tk: int) -> torch.Tensor:
        """[B, Tk] bool: the validity of the last Tk tokens (a call's keys)."""
        if self.valid.shape[-1] < Tk:
            raise ValueError(f"attention_mask: covers {self.valid.shape[-1]} tokens, fewer than "
                             f"the {Tk} keys of this call")
        return self.valid[:, self.valid.shape[-1] - Tk:]


def padding_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                 mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """Mask function for "hebbian" and "bsbr": our attention is causal by construction, so no
    [T,T] mask is built. The model's 2-D mask (padding, left or right) becomes a `PaddingMask`
    (None without one); other mask shapes cannot be honoured by a recurrent state."""
    if mask_function is not causal_mask_function:
        raise ValueError("attention mask: the hebbian/bsbr attention supports only a plain causal "
                         "mask, got a modified mask function (sliding window, packed sequences, "
                         "prefix or block masks)")
    if kv_length is not None and q_length is not None \
            and int(kv_length) != int(q_offset) + int(q_length):
        raise ValueError(f"cache: the hebbian/bsbr attention needs every past token folded into "
                         f"its state (a RecurrentCache, or a growing DynamicCache); this cache "
                         f"presents {int(kv_length)} key slots for {int(q_offset)} past + "
                         f"{int(q_length)} new tokens (a static or sliding-window cache?)")
    if attention_mask is None:
        return None
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    if kv_length is not None and valid.shape[-1] > int(kv_length):
        valid = valid[:, valid.shape[-1] - int(kv_length):]
    return PaddingMask(valid)


def check_attention_call(module, query, key, attention_mask, name: str, kwargs: dict):
    """Reject what a causal recurrent attention cannot compute, with a clear message. Returns
    the keys' validity [B, Tk] bool (a `PaddingMask`'s), or None when every key is real."""
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal", True) is False:
        raise ValueError(f"{name} attention: module {type(module).__name__} is not causal "
                         f"(cross-attention or bidirectional); only causal self-attention is "
                         f"supported")
    if attention_mask is None:
        return None
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    if isinstance(attention_mask, PaddingMask):
        valid = attention_mask.keys(Tk)
        if valid.shape[0] not in (1, B):
            raise ValueError(f"attention_mask: {valid.shape[0]} rows for a batch of {B}")
        return valid.expand(B, Tk)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError(f"attention_mask: {name} attention accepts None, a 2-D padding mask or a "
                         f"4-D causal mask, got {type(attention_mask).__name__} of shape "
                         f"{list(getattr(attention_mask, 'shape', []))}")
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if allowed.shape[-2:] != (Tq, Tk):
        raise ValueError(f"attention_mask: expected [..., {Tq}, {Tk}] (queries, keys), got "
                         f"{list(attention_mask.shape)}")
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=allowed.device).tril(Tk - Tq)
    if not bool((allowed == causal).all()):
        raise ValueError(f"attention_mask: {name} attention supports only causal masks; got a 4-D "
                         f"mask that differs from the causal one (padding or a custom pattern)")
    return None


def expand_kv_heads(query, key, value):
    """Grouped key/value heads (GQA) seen as the query heads, [B,H,T,D]: a stride-0 view when
    there is one key/value head, else expand + reshape (one copy, as transformers' repeat_kv).
    The kernels copy to contiguous memory themselves where they need it."""
    B, H = query.shape[:2]
    Hk = key.shape[1]
    if Hk == H:
        return key, value
    if H % Hk:
        raise ValueError(f"key: {Hk} key/value heads do not divide {H} query heads")

    def heads(t):
        if Hk == 1:
            return t.expand(B, H, *t.shape[2:])
        return t[:, :, None].expand(B, Hk, H // Hk, *t.shape[2:]).reshape(B, H, *t.shape[2:])

    return heads(key), heads(value)


def compute_dtype(*tensors) -> torch.dtype:
    """One dtype for the kernels: the widest input dtype (autocast can mix them), and float32
    for half types on the CPU (no fast or exact half kernels there)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"query/key/value: expected floating tensors, got {dtype}")
    if tensors[0].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def config_options(cls, config, prefix: str, overrides=None):
    """``cls`` (a dataclass of options) from the config attributes ``prefix + field``, with
    ``overrides`` (field -> value) taking their place; an absent or None attribute takes the
    field's default. ``cls`` validates in ``__post_init__``."""
    overrides = {} if overrides is None else overrides
    values = {}
    for f in dataclasses.fields(cls):
        value = overrides[f.name] if f.name in overrides else getattr(config, prefix + f.name,
                                                                      None)
        if value is not None:
            values[f.name] = value
    return cls(**values)


__all__ = ["PaddingMask", "padding_mask", "check_attention_call", "expand_kv_heads",
           "compute_dtype", "config_options"]

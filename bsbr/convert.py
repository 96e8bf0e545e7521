"""Swap the attention of a Hugging Face causal LM for Hebbian or BSBR, keeping its weights.

    from bsbr.convert import convert
    model = GPT2LMHeadModel.from_pretrained(path)          # or LlamaForCausalLM, ...
    convert(model, "bsbr", chunk_size=64, top_k=None)      # in place; returns the model
    convert(model, "hebbian", feature_map="elu")
    model.generate(ids, max_new_tokens=100)                # recurrent cache: O(1) memory per token

Only the attention kernel changes: q, k, v still come from the model's own projections (and
RoPE), so no weight is added, removed or renamed and `state_dict()` is unchanged. BSBR with
chunk_size ≥ the sequence length is exactly the original softmax attention; shorter chunks and
Hebbian attention change the function, so fine-tune briefly after converting
(`python -m experiments.convert_gpt2` measures how much).

Options become config attributes (saved by `save_pretrained`):
    hebbian: feature_map ("elu" | "relu") → hebbian_feature_map, eps → hebbian_eps,
             chunk_size → hebbian_chunk_size, backend → hebbian_backend
    bsbr:    chunk_size → bsbr_chunk_size (default 64), top_k → bsbr_top_k (None: all chunks),
             long_scale → bsbr_long_scale (None: scaling / chunk_size; see bsbr.hf),
             backend → bsbr_backend
recurrent_cache=True (default) also makes this model instance's `generate` keep a recurrent state
(`bdh.hf.use_recurrent_cache`). The saved config stays plain transformers; a reloaded model needs
`import bdh.hf, bsbr.hf` (registration), `from_pretrained(..., attn_implementation=kind)` and
`use_recurrent_cache(model)` again (or simply `convert(model, kind)` with no options).
"""
from __future__ import annotations

from bdh import hf as bdh_hf
from bdh.hf import HEBBIAN, hebbian_options, use_recurrent_cache

from . import hf as bsbr_hf
from .hf import BSBR, bsbr_options

KINDS = (HEBBIAN, BSBR)
OPTIONS = {
    HEBBIAN: {"feature_map": "hebbian_feature_map", "eps": "hebbian_eps",
              "chunk_size": "hebbian_chunk_size", "backend": "hebbian_backend"},
    BSBR: {"chunk_size": "bsbr_chunk_size", "top_k": "bsbr_top_k",
           "long_scale": "bsbr_long_scale", "backend": "bsbr_backend", "bank": "bsbr_bank"},
}


def convert(model, kind: str, *, recurrent_cache: bool = True, **opts):
    """Swap ``model``'s attention for ``kind`` ("hebbian" | "bsbr") in place and return it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model: expected a transformers PreTrainedModel (e.g. GPT2LMHeadModel, "
                        f"LlamaForCausalLM), got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    unknown = sorted(set(opts) - set(OPTIONS[kind]))
    if unknown:
        raise TypeError(f"convert(kind={kind!r}): unknown option(s) {unknown}; expected some of "
                        f"{sorted(OPTIONS[kind])}")
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "add_cross_attention", False):
        raise ValueError(f"model: {type(model).__name__} uses cross-attention, which a causal "
                         f"recurrent attention cannot replace; expected a decoder-only causal LM")
    for opt, value in opts.items():
        setattr(text, OPTIONS[kind][opt], value)
        if text is not config:
            setattr(config, OPTIONS[kind][opt], value)
    (hebbian_options if kind == HEBBIAN else bsbr_options)(text)     # validate eagerly
    bdh_hf.register()
    bsbr_hf.register()
    model.set_attn_implementation(kind)
    if recurrent_cache:
        use_recurrent_cache(model)
    return model


__all__ = ["convert", "KINDS", "OPTIONS"]

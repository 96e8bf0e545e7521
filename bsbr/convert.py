"""Swap the attention of a Hugging Face causal LM for Hebbian or BSBR, keeping its weights.

    from bsbr import convert
    model = GPT2LMHeadModel.from_pretrained(path)          # or LlamaForCausalLM, ...
    convert(model, "bsbr", chunk_size=64, top_k=None)      # in place; returns the model
    convert(model, "hebbian", feature_map="elu")
    model.generate(ids, max_new_tokens=100)                # recurrent cache: O(1) memory per token

Only the attention kernel changes: q, k, v still come from the model's own projections (and
RoPE), so no weight is added, removed or renamed and `state_dict()` is unchanged. BSBR with
chunk_size ≥ the sequence length is exactly the original softmax attention; shorter chunks and
Hebbian attention change the function, so fine-tune briefly after converting
(`python -m experiments.convert_gpt2` measures how much).

Options become config attributes (saved by `save_pretrained`), ``<kind>_<option>``:
    hebbian: feature_map, eps, chunk_size, backend (`glassbrain.hf.HebbianOptions`)
    bsbr:    chunk_size, top_k, long_scale, backend, bank (`bsbr.BSBROptions`)
recurrent_cache=True (default) also makes this model instance's `generate` keep a recurrent state
(`glassbrain.hf.use_recurrent_cache`). The saved config stays plain transformers; a reloaded model
needs `import bsbr` (registration), `from_pretrained(..., attn_implementation=kind)` and
`use_recurrent_cache(model)` again (or simply `convert(model, kind)` with no options).

`convert` is all or nothing: the model, the options (the model's config with them applied) and
the recurrent-cache hook are checked first, and on any error the model and its config are left
exactly as they were.
"""
from __future__ import annotations

import dataclasses

from transformers.generation.utils import GenerationMixin

from glassbrain.hf import HEBBIAN, HebbianOptions, check_generation_hook, use_recurrent_cache
from glassbrain.hf.hebbian import register as register_hebbian

from .hf import BSBR, BSBROptions
from .hf import register as register_bsbr

KINDS = (HEBBIAN, BSBR)


def options_class(kind: str):
    """The options dataclass of ``kind``: its fields are `convert`'s keyword options."""
    return HebbianOptions if kind == HEBBIAN else BSBROptions


def check_servable(model, recurrent_cache: bool = True) -> None:
    """Raise unless ``model`` is a transformers model whose attention we can replace: it calls
    its attention through AttentionInterface, every attention module is causal, and no layer
    attends to another sequence (cross-attention)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model: expected a transformers PreTrainedModel (e.g. GPT2LMHeadModel, "
                        f"LlamaForCausalLM), got {name}")
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False) or getattr(text, "add_cross_attention", False):
        raise ValueError(f"model: {name} uses cross-attention, which a causal recurrent "
                         f"attention cannot replace; expected a decoder-only causal LM")
    if not model._can_set_attn_implementation():
        raise ValueError(f"model: {name} does not call its attention through transformers' "
                         f"AttentionInterface, so its attention cannot be swapped")
    for path, module in model.named_modules():
        if getattr(module, "is_causal", True) is False:
            raise ValueError(f"model: {name} has bidirectional attention ({path}: is_causal is "
                             f"False); expected a decoder-only causal LM")
    if recurrent_cache:
        if not isinstance(model, GenerationMixin):
            raise TypeError(f"model: recurrent_cache=True needs a transformers generation model "
                            f"(GenerationMixin), got {name}; pass recurrent_cache=False")
        check_generation_hook()


def _config_snapshot(model, attributes):
    """What `convert` may change: every config's attention implementation and ``attributes``
    of the top-level and text configs, as (config, name, present, value)."""
    configs = {id(model.config): model.config}
    text = model.config.get_text_config(decoder=True)
    configs[id(text)] = text
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = cfg
    saved = []
    for cfg in configs.values():
        for name in ("_attn_implementation_internal", *attributes):
            present = name in vars(cfg)
            saved.append((cfg, name, present, vars(cfg).get(name)))
    return saved


def _restore(saved) -> None:
    for cfg, name, present, value in saved:
        if present:
            setattr(cfg, name, value)
        elif name in vars(cfg):
            delattr(cfg, name)


def convert(model, kind: str, *, recurrent_cache: bool = True, **opts):
    """Swap ``model``'s attention for ``kind`` ("hebbian" | "bsbr") in place and return it.

    ``opts``: the fields of ``kind``'s options (`options_class`), stored on the model config as
    ``<kind>_<field>``; options not given keep the config's value or the default. Raises before
    changing anything: TypeError for a model that is not a transformers model or an unknown
    option, ValueError for a model it cannot serve or a bad option value."""
    check_servable(model, recurrent_cache)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    cls = options_class(kind)
    fields = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise TypeError(f"convert(kind={kind!r}): unknown option(s) {unknown}; expected some of "
                        f"{fields}")
    text = model.config.get_text_config(decoder=True)
    cls.from_config(text, opts)                       # every option of the result, checked
    register_hebbian()
    register_bsbr()
    attributes = [cls.PREFIX + opt for opt in opts]
    saved = _config_snapshot(model, attributes)
    try:
        for opt, value in opts.items():
            for cfg in {id(c): c for c in (text, model.config)}.values():
                setattr(cfg, cls.PREFIX + opt, value)
        model.set_attn_implementation(kind)
    except BaseException:
        _restore(saved)
        raise
    if recurrent_cache:
        use_recurrent_cache(model)
    return model


__all__ = ["convert", "check_servable", "options_class", "KINDS"]

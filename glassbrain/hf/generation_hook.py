"""`use_recurrent_cache(model)`: make `model.generate` build a `RecurrentCache` by itself and
decode through a captured CUDA graph (`glassbrain.hf.graph.RecurrentDecoder`) where it can.

transformers 5.24 has no public way for a model to choose the cache class `generate` builds:
`cache_implementation` takes only its own names, and the `_layer_type` registry of cache layers
is keyed by `config.layer_types`, which models also read for their masks. Passing
``cache=RecurrentCache(model.config)`` to `generate` is the supported route, and always works.
For the default, this module wraps the one private hook that builds the cache,
`GenerationMixin._prepare_cache_for_generation`: it runs the original and swaps the plain
`DynamicCache` it made for a `RecurrentCache`.

The decode loop: `generate` picks its per-token forward as
``self.get_compiled_call(compile_config) if self._valid_auto_compile_criteria(...) else
self.__call__``. Both are wrapped per model instance: with a `RecurrentCache` the criteria say
yes where the decoder serves the device (CUDA, or mode "graph") and the "compiled call" is the
decoder; any other cache keeps transformers' own behaviour. ``disable_compile=True`` in the
generation config turns the decoder off for that call. Beam search never asks (it decodes
eagerly). `check_generation_hook` says loudly, naming the transformers version, when any hook
is not what this was written against.
"""
from __future__ import annotations

import inspect
import types

import transformers
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerationMixin

from .cache import RecurrentCache
from .graph import DECODE_MODES, RecurrentDecoder

HOOK = "_prepare_cache_for_generation"
HOOK_PARAMETERS = ("self", "generation_config", "model_kwargs", "generation_mode", "batch_size",
                   "max_cache_length")
CRITERIA = "_valid_auto_compile_criteria"
CRITERIA_PARAMETERS = ("self", "model_kwargs", "generation_config")
COMPILED_CALL = "get_compiled_call"
COMPILED_CALL_PARAMETERS = ("self", "compile_config")
WRITTEN_FOR = "5.24"


def _check_hook(owner, name: str, expected: tuple) -> None:
    hook = getattr(owner, name, None)
    found = None if hook is None else tuple(inspect.signature(hook).parameters)
    if found != expected:
        raise RuntimeError(f"use_recurrent_cache: transformers {transformers.__version__} changed "
                           f"{owner.__name__}.{name} (parameters {found}, expected {expected}; "
                           f"written for transformers {WRITTEN_FOR}). Pass "
                           f"cache=RecurrentCache(model.config) to generate() instead")


def check_generation_hook() -> None:
    """Raise RuntimeError unless GenerationMixin's cache hook and the two hooks of its decode
    loop have the parameters this module wraps (the behaviour is pinned by
    tests/integrations/test_generation_hook.py)."""
    from transformers import PreTrainedModel
    _check_hook(GenerationMixin, HOOK, HOOK_PARAMETERS)
    _check_hook(GenerationMixin, CRITERIA, CRITERIA_PARAMETERS)
    _check_hook(PreTrainedModel, COMPILED_CALL, COMPILED_CALL_PARAMETERS)


def _prepare_recurrent_cache(self, generation_config, model_kwargs, *args, **kwargs):
    """`generate`'s cache preparation, then its fresh plain DynamicCache swapped for a
    RecurrentCache (bound to one model instance by `use_recurrent_cache`). A cache the caller
    passed, an offloaded or quantized one, or an assistant model's is left alone."""
    before = model_kwargs.get("cache")
    out = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs,
                                                   *args, **kwargs)
    made = model_kwargs.get("cache")
    if made is not before and type(made) is DynamicCache and not made.offloading \
            and not getattr(generation_config, "is_assistant", False):
        model_kwargs["cache"] = RecurrentCache(self.config)
    return out


def _decode_criteria(self, model_kwargs, generation_config):
    """`generate`'s choice of the decode-loop forward: the recurrent decoder for a
    `RecurrentCache` on a device it serves, transformers' own rule for any other cache."""
    if isinstance(model_kwargs.get("cache"), RecurrentCache):
        use = not generation_config.disable_compile and self._recurrent_decoder.serves(self.device)
        self._recurrent_decoding = use
        return use
    self._recurrent_decoding = False
    return type(self)._valid_auto_compile_criteria(self, model_kwargs, generation_config)


def _decode_call(self, compile_config):
    if self._recurrent_decoding:
        return self._recurrent_decoder
    return type(self).get_compiled_call(self, compile_config)


def use_recurrent_cache(model, decode: str = "auto") -> RecurrentDecoder | None:
    """Make ``model.generate`` keep a `RecurrentCache` (fixed-size states) instead of a KV cache,
    and decode through `RecurrentDecoder`: ``decode`` "auto" captures each decode step as a
    CUDA graph on CUDA (plain eager steps elsewhere), "graph" uses the decoder's buffers on any
    device (capturing on CUDA), "eager" never. Returns the decoder (None for "eager").

    Only this model instance changes; nothing is written to the config, so `save_pretrained`
    output stays loadable by plain transformers, and a reloaded model needs this call again."""
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"model: expected a transformers generation model (GenerationMixin), "
                        f"got {type(model).__name__}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode: expected one of {DECODE_MODES}, got {decode!r}")
    check_generation_hook()
    setattr(model, HOOK, types.MethodType(_prepare_recurrent_cache, model))
    for name in (CRITERIA, COMPILED_CALL):
        model.__dict__.pop(name, None)
    model.__dict__.pop("_recurrent_decoder", None)
    if decode == "eager":
        return None
    decoder = RecurrentDecoder(model, decode)
    model.__dict__["_recurrent_decoder"] = decoder
    model.__dict__["_recurrent_decoding"] = False
    setattr(model, CRITERIA, types.MethodType(_decode_criteria, model))
    setattr(model, COMPILED_CALL, types.MethodType(_decode_call, model))
    return decoder


__all__ = ["use_recurrent_cache", "check_generation_hook"]

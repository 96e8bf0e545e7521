"""`use_recurrent_cache(model)`: make `model.generate` build a `RecurrentCache` by itself.

transformers 5.24 has no public way for a model to choose the cache class `generate` builds:
`cache_implementation` takes only its own names, and the `_layer_type` registry of cache layers
is keyed by `config.layer_types`, which models also read for their masks. Passing
``cache=RecurrentCache(model.config)`` to `generate` is the supported route, and always works.
For the default, this module wraps the one private hook that builds the cache,
`GenerationMixin._prepare_cache_for_generation`: it runs the original and swaps the plain
`DynamicCache` it made for a `RecurrentCache`. `check_generation_hook` says loudly, naming the
transformers version, when that hook is not what this was written against.
"""
from __future__ import annotations

import inspect
import types

import transformers
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerationMixin

from .cache import RecurrentCache

HOOK = "_prepare_cache_for_generation"
HOOK_PARAMETERS = ("self", "generation_config", "model_kwargs", "generation_mode", "batch_size",
                   "max_cache_length")
WRITTEN_FOR = "5.24"


def check_generation_hook() -> None:
    """Raise RuntimeError unless GenerationMixin's cache hook has the parameters this module
    wraps (the behaviour is pinned by tests/integrations/test_generation_hook.py)."""
    hook = getattr(GenerationMixin, HOOK, None)
    found = None if hook is None else tuple(inspect.signature(hook).parameters)
    if found != HOOK_PARAMETERS:
        raise RuntimeError(f"use_recurrent_cache: transformers {transformers.__version__} changed "
                           f"GenerationMixin.{HOOK} (parameters {found}, expected "
                           f"{HOOK_PARAMETERS}; written for transformers {WRITTEN_FOR}). Pass "
                           f"cache=RecurrentCache(model.config) to generate() instead")


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


def use_recurrent_cache(model) -> None:
    """Make ``model.generate`` keep a `RecurrentCache` (fixed-size states) instead of a KV cache.

    Only this model instance changes; nothing is written to the config, so `save_pretrained`
    output stays loadable by plain transformers, and a reloaded model needs this call again."""
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"model: expected a transformers generation model (GenerationMixin), "
                        f"got {type(model).__name__}")
    check_generation_hook()
    setattr(model, HOOK, types.MethodType(_prepare_recurrent_cache, model))


__all__ = ["use_recurrent_cache", "check_generation_hook"]

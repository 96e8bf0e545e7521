"""use_recurrent_cache wraps transformers' private GenerationMixin._prepare_cache_for_generation.
These tests fail loudly, naming the transformers version, when that hook changes its signature
or stops writing the cache it builds into model_kwargs["cache"]."""
import pytest
import torch
import transformers
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerationMixin

import glassbrain.hf.generation_hook as hook
from glassbrain.hf import RecurrentCache, use_recurrent_cache

VERSION = f"transformers {transformers.__version__}"


def tiny():
    return GPT2LMHeadModel(GPT2Config(vocab_size=17, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_the_hook_has_the_wrapped_signature():
    try:
        hook.check_generation_hook()
    except RuntimeError as exc:
        pytest.fail(f"{VERSION}: {exc}")


def test_the_hook_still_writes_a_fresh_dynamic_cache_into_model_kwargs():
    model, kwargs = tiny(), {}
    gen = GenerationConfig(use_cache=True)
    GenerationMixin._prepare_cache_for_generation(model, gen, kwargs, None, 1, 8)
    assert type(kwargs.get("cache")) is DynamicCache, (
        f"{VERSION}: GenerationMixin.{hook.HOOK} no longer writes a DynamicCache to "
        f"model_kwargs['cache'] (got {sorted(kwargs)}); use_recurrent_cache must be revised")


def test_wrapped_hook_swaps_only_the_default_cache():
    model = tiny()
    use_recurrent_cache(model)
    made = {}
    model._prepare_cache_for_generation(GenerationConfig(use_cache=True), made, None, 1, 8)
    assert isinstance(made["cache"], RecurrentCache) and len(made["cache"].layers) == 2
    mine = DynamicCache()
    given = {"cache": mine}
    model._prepare_cache_for_generation(GenerationConfig(use_cache=True), given, None, 1, 8)
    assert given["cache"] is mine                      # a cache the caller passed stays
    none = {}
    model._prepare_cache_for_generation(GenerationConfig(use_cache=False), none, None, 1, 8)
    assert "cache" not in none


def test_a_changed_hook_is_refused_with_the_version(monkeypatch):
    def changed(self, generation_config, model_kwargs, max_cache_length):
        return None

    monkeypatch.setattr(GenerationMixin, hook.HOOK, changed)
    with pytest.raises(RuntimeError, match=f"transformers {transformers.__version__} changed"):
        use_recurrent_cache(tiny())


def test_generate_uses_the_recurrent_cache():
    model = tiny()
    model.set_attn_implementation("hebbian")
    use_recurrent_cache(model)
    out = model.generate(torch.randint(1, 17, (1, 4)), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, RecurrentCache)

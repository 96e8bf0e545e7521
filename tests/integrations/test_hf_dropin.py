"""Hebbian and BSBR attention inside Hugging Face models (glassbrain.hf, bsbr.hf): registration,
the attention functions against float64 references, causality, the recurrent cache for generate,
errors for what they cannot do, and autocast. Tiny random GPT-2 / Llama models on the CPU."""
import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, rel_err
from transformers import (AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.gpt2.modeling_gpt2 import GPT2Model

import bsbr.hf as bsbr_hf
import glassbrain.hf.hebbian as heb_hf
from glassbrain.hf import (STATE_KWARG, RecurrentCache, RecurrentStateLayer, cache_layer,
                           cache_nbytes, expand_kv_heads, state_tensors, use_recurrent_cache)
from kernels.bsbr import bsbr_attention_ref, chunk_local_attention_ref

V = 37
CACHE_KW = ("cache" if "cache" in inspect.signature(GPT2Model.forward).parameters
            else "past_key_values")


def tiny(arch: str):
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=24, n_layer=2, n_head=3,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def swap(model, kind, chunk_size=4, recurrent=True):
    model.config.bsbr_chunk_size = chunk_size
    model.set_attn_implementation(kind)
    if recurrent:
        use_recurrent_cache(model)
    return model


def out_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def hebbian_ref(q, k, v, kind="elu", eps=1e-6):
    """o_t = Σ_{s≤t} (φq_t·φk_s) v_s / (Σ_{s≤t} φq_t·φk_s + eps), float64, quadratic form."""
    phi = (lambda x: F.elu(x) + 1) if kind == "elu" else F.relu
    q, k, v = (t.double() for t in (q, k, v))
    T = q.shape[2]
    A = (phi(q) @ phi(k).transpose(-1, -2)) * torch.ones(T, T, dtype=torch.bool).tril()
    return (A @ v) / (A.sum(-1, keepdim=True) + eps)


def module_for(**cfg):
    return SimpleNamespace(config=SimpleNamespace(**cfg), is_causal=True, training=False)


# ----------------------------------------------------------------------------- registration
def test_registered_with_transformers():
    for name in ("hebbian", "bsbr"):
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_from_pretrained_attn_implementation(tmp_path, kind):
    model = tiny("llama")
    model.config.bsbr_chunk_size = 4
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=kind).eval()
    assert loaded.config._attn_implementation == kind
    ids = torch.randint(0, V, (2, 9))
    swap(model, kind, recurrent=False)
    with torch.no_grad():
        assert_rel_close(loaded(ids).logits, model(ids).logits, 1e-6)


# ----------------------------------------------------------------------------- attention functions
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_hebbian_function_matches_reference_with_grads(feature_map):
    B, H, T, D = 2, 3, 37, 7                     # T not a multiple of the kernel chunk
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    mod = module_for(hebbian_feature_map=feature_map, hebbian_chunk_size=16)
    o, w = heb_hf.hebbian_attention_forward(mod, q, k, v, None, scaling=D ** -0.5)
    assert w is None and o.shape == (B, T, H, D)
    ref = hebbian_ref(q, k, v, feature_map).transpose(1, 2)
    assert_rel_close(o, ref, 1e-5)
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do.double()).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_rel_close(g, r, 1e-4, name=f"d{name}")


@pytest.mark.parametrize("chunk_size,top_k,long_scale", [(5, None, None), (4, 2, None),
                                                         (4, None, 1.0), (64, None, None)])
def test_bsbr_function_matches_reference_with_grads(chunk_size, top_k, long_scale):
    B, H, T, D = 2, 3, 19, 6
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    mod = module_for(bsbr_chunk_size=chunk_size, bsbr_top_k=top_k, bsbr_long_scale=long_scale)
    o, _ = bsbr_hf.bsbr_attention_forward(mod, q, k, v, None, scaling=0.3)
    qd, kd, vd = (t.double() for t in (q, k, v))
    # DESIGN's BSBR (long term unscaled) split into local + long; the long term scaled by λ.
    full = bsbr_attention_ref(qd, kd, vd, qd, kd, chunk_size=chunk_size, top_k=top_k, scale=0.3)
    local = chunk_local_attention_ref(qd, kd, vd, chunk_size=chunk_size, scale=0.3)
    lam = 0.3 / chunk_size if long_scale is None else long_scale
    ref = (local + lam * (full - local)).transpose(1, 2)
    assert_rel_close(o, ref, 1e-5)
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do.double()).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_rel_close(g, r, 1e-4, name=f"d{name}")


def test_grouped_kv_heads_are_repeated():
    q = torch.randn(1, 4, 9, 5)
    k, v = torch.randn(1, 2, 9, 5), torch.randn(1, 2, 9, 5)
    o, _ = heb_hf.hebbian_attention_forward(module_for(), q, k, v, None)
    ref = hebbian_ref(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)).transpose(1, 2)
    assert_rel_close(o, ref, 1e-5)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_model_is_causal(arch, kind):
    model = swap(tiny(arch), kind, recurrent=False)
    ids = torch.randint(0, V, (2, 13))
    t = 6
    ids2 = ids.clone()
    ids2[:, t] = (ids[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_cached_generate_equals_full_forward(arch, kind):
    model = swap(tiny(arch), kind, chunk_size=4)
    ids = torch.randint(1, V, (2, 7))                 # prompt ends mid-chunk; decode crosses chunks
    g = model.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)
    cache = out_cache(g)
    assert all(isinstance(layer, RecurrentStateLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 7 + 9 - 1       # the last token is sampled, not fed back
    with torch.no_grad():
        full = model(g.sequences, use_cache=False).logits
    for i, step_logits in enumerate(g.logits):
        assert_rel_close(step_logits, full[:, 6 + i], 1e-5, name=f"step {i}")
    # Greedy decoding: every generated token is the argmax of the full forward before it.
    assert torch.equal(g.sequences[:, 7:], full[:, 6:-1].argmax(-1))


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_forward_in_pieces_with_cache(kind):
    model = swap(tiny("gpt2"), kind, chunk_size=4)
    ids = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, outs = RecurrentCache(model.config), []
        for a, b in [(0, 5), (5, 6), (6, 14)]:
            out = model(ids[:, a:b], use_cache=True, **{CACHE_KW: cache})
            outs.append(out.logits)
    assert_rel_close(torch.cat(outs, 1), full, 1e-5)
    assert cache.get_seq_length() == 14 and cache.nbytes() > 0


def test_hebbian_cache_memory_is_constant():
    model = swap(tiny("llama"), "hebbian")
    sizes = []
    with torch.no_grad():
        for T in (3, 40):
            cache = RecurrentCache(model.config)
            model(torch.randint(0, V, (1, T)), use_cache=True, **{CACHE_KW: cache})
            sizes.append(cache_nbytes(cache))
    # 2 layers x [B=1, H=4, D=6, D+1=7] float32
    assert sizes == [2 * 4 * 6 * 7 * 4] * 2


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_plain_kv_cache_still_correct(kind):
    """Without the recurrent cache (default DynamicCache) the history is replayed: same tokens."""
    model = swap(tiny("llama"), kind, chunk_size=4, recurrent=False)
    ids = torch.randint(1, V, (1, 6))
    g = model.generate(ids, max_new_tokens=7, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)
    assert not isinstance(out_cache(g).layers[0], RecurrentStateLayer)
    with torch.no_grad():
        full = model(g.sequences, use_cache=False).logits
    for i, step_logits in enumerate(g.logits):
        assert_rel_close(step_logits, full[:, 5 + i], 1e-5, name=f"step {i}")


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_beam_search_reorders_recurrent_state(kind):
    model = swap(tiny("gpt2"), kind, chunk_size=4, recurrent=False)
    ids = torch.randint(1, V, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3)
    ref = model.generate(ids, **kw)                  # KV-cache replay: independent of reordering
    use_recurrent_cache(model)
    assert torch.equal(model.generate(ids, **kw), ref)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [heb_hf.hebbian_attention_forward, bsbr_hf.bsbr_attention_forward])
def test_function_rejects_non_causal_use(fn):
    q = torch.randn(1, 2, 5, 4)
    cross = SimpleNamespace(config=SimpleNamespace(), is_causal=False)
    with pytest.raises(ValueError, match="not causal"):
        fn(cross, q, q, q, None)
    full = torch.zeros(1, 1, 5, 5)                     # an all-visible (bidirectional) float mask
    with pytest.raises(ValueError, match="only causal"):
        fn(module_for(), q, q, q, full)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    fn(module_for(), q, q, q, causal)                  # the causal mask itself is accepted


def test_bad_config_options_raise():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="bsbr_chunk_size"):
        bsbr_hf.bsbr_attention_forward(module_for(bsbr_chunk_size=0), q, q, q, None)
    with pytest.raises(ValueError, match="bsbr_long_scale"):
        bsbr_hf.bsbr_attention_forward(module_for(bsbr_long_scale=0.0), q, q, q, None)
    with pytest.raises(ValueError, match="hebbian_feature_map"):
        heb_hf.hebbian_attention_forward(module_for(hebbian_feature_map="softmax"), q, q, q, None)


BAD_OPTIONS = [
    ("hebbian", "hebbian_eps", float("nan"), ValueError),
    ("hebbian", "hebbian_eps", -1e9, ValueError),
    ("hebbian", "hebbian_eps", "x", TypeError),
    ("hebbian", "hebbian_chunk_size", 17, ValueError),
    ("hebbian", "hebbian_backend", "tritn", ValueError),
    ("bsbr", "bsbr_chunk_size", "64", TypeError),
    ("bsbr", "bsbr_top_k", 0, ValueError),
    ("bsbr", "bsbr_long_scale", float("nan"), ValueError),
    ("bsbr", "bsbr_backend", "cuda", ValueError),
    ("bsbr", "bsbr_bank", [1, 2], ValueError),
]


@pytest.mark.parametrize("kind,option,value,error", BAD_OPTIONS)
def test_every_config_option_is_checked_by_name(kind, option, value, error):
    """Each option an attention function reads is validated before any work, the error naming
    config.<option> (a nan eps used to make every logit NaN; "x" gave an unnamed float() error)."""
    fn = heb_hf.hebbian_attention_forward if kind == "hebbian" else bsbr_hf.bsbr_attention_forward
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(error, match=f"config.{option}"):
        fn(module_for(**{option: value}), q, q, q, None)


def test_recurrent_cache_with_other_attention_raises():
    model = tiny("gpt2")                               # sdpa: it never writes the state
    ids = torch.randint(0, V, (1, 6))
    cache = RecurrentCache(model.config)
    with torch.no_grad():
        model(ids[:, :4], use_cache=True, **{CACHE_KW: cache})
        with pytest.raises(RuntimeError, match="never reached"):
            model(ids[:, 4:], use_cache=True, **{CACHE_KW: cache})


def test_cache_layer_reaches_the_function_through_the_attention_kwargs():
    """update() hands the keys back untouched (no attribute set on them) and puts the layer in
    the kwargs dict the model passes on to its attention function."""
    layer = RecurrentStateLayer(layer_idx=1)
    k, v, kw = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), {}
    k2, v2 = layer.update(k, v, kwargs=kw)
    assert k2 is k and v2 is v and not vars(k) and kw[STATE_KWARG] is layer
    assert cache_layer(SimpleNamespace(layer_idx=1), kw) is layer
    assert cache_layer(SimpleNamespace(layer_idx=1), {}) is None
    with pytest.raises(RuntimeError, match="layer 0 was handed the cache layer 1"):
        cache_layer(SimpleNamespace(layer_idx=0), kw)


def test_expand_kv_heads_copies_only_for_groups():
    q = torch.randn(1, 4, 5, 3)
    k1, v1 = torch.randn(1, 1, 5, 3), torch.randn(1, 1, 5, 3)
    k, v = expand_kv_heads(q, k1, v1)
    assert k.shape == (1, 4, 5, 3) and k.data_ptr() == k1.data_ptr() and k.stride(1) == 0
    assert torch.equal(v, v1.expand(1, 4, 5, 3))
    k2, v2 = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)
    k, v = expand_kv_heads(q, k2, v2)
    assert torch.equal(k, k2.repeat_interleave(2, 1)) and torch.equal(v, v2.repeat_interleave(2, 1))
    with pytest.raises(ValueError, match="do not divide"):
        expand_kv_heads(q, torch.randn(1, 3, 5, 3), torch.randn(1, 3, 5, 3))


@pytest.mark.parametrize("kind,bank", [("hebbian", None), ("bsbr", [2, 1])])
def test_decoding_updates_the_cached_state_in_place(kind, bank):
    """After the prompt, every decoded token writes the layer's state into the same tensors
    (fixed shapes, fixed addresses): across chunk completions and, for the bounded BSBR bank,
    merges and archive folds (chunk 4, 3 slots: full after 12 tokens)."""
    model = swap(tiny("gpt2"), kind, chunk_size=4)
    model.config.bsbr_bank = bank
    ids = torch.randint(1, V, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = RecurrentCache(model.config)
        model(ids[:, :18], use_cache=True, **{CACHE_KW: cache})
        states = [layer.state for layer in cache.layers]
        ptrs = [[t.data_ptr() for t in state_tensors(s)] for s in states]
        steps = []
        for t in range(18, 40):
            steps.append(model(ids[:, t:t + 1], use_cache=True, **{CACHE_KW: cache}).logits)
    assert all(layer.state is s for layer, s in zip(cache.layers, states))
    assert [[t.data_ptr() for t in state_tensors(s)] for s in states] == ptrs
    if bank is None:                                    # the bounded bank approximates past 12
        assert_rel_close(torch.cat(steps, 1), full[:, 18:], 1e-5)
    else:
        assert torch.isfinite(torch.cat(steps, 1)).all()
        assert all(bool((s.counts[..., 0] > 0).all()) for s in states)   # the archive is in use


def test_recurrent_cache_cannot_be_cropped():
    layer = RecurrentStateLayer()
    layer.crop(0)
    with pytest.raises(ValueError, match="tokens_to_remove"):
        layer.crop(-2)


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_autocast_bf16_on_fp32_model(kind):
    model = swap(tiny("gpt2"), kind)
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids).logits
            g = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    assert g.shape == (2, 8)
    assert rel_err(out.float(), ref) < 3e-2


def test_static_cache_is_refused():
    model = swap(tiny("gpt2"), "hebbian", recurrent=False)
    with pytest.raises(ValueError, match="static or sliding"):
        model.generate(torch.randint(1, V, (1, 5)), max_new_tokens=2, do_sample=False,
                       cache_implementation="static")


def test_use_recurrent_cache_needs_a_generation_model():
    with pytest.raises(TypeError, match="model"):
        use_recurrent_cache(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_bf16_model_on_cpu(kind):
    model = swap(tiny("llama"), kind)
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        model.to(torch.bfloat16)
        out = model(ids).logits
        g = model.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    assert out.dtype == torch.bfloat16 and g.shape == (2, 8)
    assert rel_err(out.float(), ref) < 5e-2


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_triton_backends_generate(kind):
    """The Triton kernels (interpreter on the CPU): a normaliser column makes V = D + 1, and the
    BSBR decode calls run with a partial chunk and a bank."""
    model = swap(tiny("gpt2"), kind, chunk_size=4)
    model.config.hebbian_backend = model.config.bsbr_backend = "triton"
    ids = torch.randint(1, V, (1, 6))
    g = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)
    model.config.hebbian_backend = model.config.bsbr_backend = "reference"
    with torch.no_grad():
        full = model(g.sequences, use_cache=False).logits
    for i, step_logits in enumerate(g.logits):
        assert_rel_close(step_logits, full[:, 5 + i], 1e-4, name=f"step {i}")


# ------------------------------------------------------------- BSBR: the bounded bank in the cache
def test_bsbr_bounded_bank_within_capacity_equals_exact_generate():
    """While the completed chunks fit in level 0, the bounded bank is the exact bank: cached
    greedy generate gives the same logits as the full forward (which routes over every chunk)."""
    model = swap(tiny("gpt2"), "bsbr", chunk_size=4)
    model.config.bsbr_bank = [8, 2, 2]               # 16 tokens in 4 chunks: all in level 0
    ids = torch.randint(1, V, (2, 7))
    g = model.generate(ids, max_new_tokens=9, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)
    with torch.no_grad():
        full = model(g.sequences, use_cache=False).logits
    for i, step_logits in enumerate(g.logits):
        assert_rel_close(step_logits, full[:, 6 + i], 1e-5, name=f"step {i}")


def test_bsbr_bounded_bank_cache_has_one_size_at_any_length():
    """Past capacity the bank merges and archives: the cache's bytes are the same after 20 and
    after 60 tokens (the exact bank's grow), and decoding past capacity stays finite."""
    model = swap(tiny("llama"), "bsbr", chunk_size=4)
    model.config.bsbr_bank = [2, 2, 1]               # capacity 5 slots + archive
    sizes = {}
    with torch.no_grad():
        for bank in ([2, 2, 1], None):
            model.config.bsbr_bank = bank
            for T in (20, 60):
                cache = RecurrentCache(model.config)
                out = model(torch.randint(0, V, (1, T)), use_cache=True, **{CACHE_KW: cache})
                assert torch.isfinite(out.logits).all()
                sizes[(str(bank), T)] = cache_nbytes(cache)
    assert sizes[("[2, 2, 1]", 20)] == sizes[("[2, 2, 1]", 60)]
    assert sizes[("None", 60)] > sizes[("None", 20)]
    model.config.bsbr_bank = [2, 2, 1]
    g = model.generate(torch.randint(1, V, (1, 30)), max_new_tokens=10, do_sample=False)
    assert g.shape == (1, 40)


def test_bsbr_bank_option_is_checked():
    model = swap(tiny("gpt2"), "bsbr")
    model.config.bsbr_bank = "big"
    with pytest.raises(ValueError, match="bsbr_bank"):
        model(torch.randint(0, V, (1, 5)))


def test_bsbr_bounded_bank_beam_search_equals_the_exact_bank_before_merging():
    """Beam search reorders the cache rows: with the bounded bank's layout riding as a host
    tuple, beams still match the exact bank while nothing has merged (16 + 6 tokens, chunk 4,
    8 level-0 slots)."""
    model = swap(tiny("llama"), "bsbr", chunk_size=4)
    prompt = torch.randint(1, V, (1, 14))
    outs = {}
    with torch.no_grad():
        for bank in ([8, 2, 2], None):
            model.config.bsbr_bank = bank
            outs[str(bank)] = model.generate(prompt, max_new_tokens=6, num_beams=3,
                                             do_sample=False)
    assert torch.equal(outs["[8, 2, 2]"], outs["None"])

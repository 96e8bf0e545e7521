"""bsbr.convert.convert: swap the attention of GPT-2 / Llama models in place, keeping weights."""
import pytest
import torch
from helpers import assert_rel_close, rel_err
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from glassbrain.hf import RecurrentStateLayer
from bsbr.convert import convert

V = 41


def tiny(arch: str):
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=48, n_embd=20, n_layer=2,
                                          n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=36,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=48,
                                        bos_token_id=0, eos_token_id=0)).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bsbr_with_one_chunk_equals_original(arch):
    model = tiny(arch)
    ids = torch.randint(0, V, (3, 17))
    with torch.no_grad():
        ref = model(ids).logits
    before = snapshot(model)
    assert convert(model, "bsbr", chunk_size=32) is model           # chunk >= T: softmax
    with torch.no_grad():
        out = model(ids).logits
    assert_rel_close(out, ref, 1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bsbr_one_chunk_gradients_equal_original(arch):
    model = tiny(arch)
    ids = torch.randint(0, V, (2, 13))
    ref = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    convert(model, "bsbr", chunk_size=16)
    got = torch.autograd.grad(model(ids, labels=ids).loss, list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), got, ref):
        assert_rel_close(g, r, 1e-4, name=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind,opts", [("bsbr", dict(chunk_size=4, top_k=2)),
                                       ("hebbian", dict(feature_map="elu"))])
def test_converted_model_changes_function_and_generates(arch, kind, opts):
    model = tiny(arch)
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    convert(model, kind, **opts)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all() and rel_err(out, ref) > 1e-3      # really swapped
    g = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                       output_logits=True)
    cache = getattr(g, "cache", None) or g.past_key_values
    assert isinstance(cache.layers[0], RecurrentStateLayer)
    with torch.no_grad():
        full = model(g.sequences, use_cache=False).logits
    for i, step_logits in enumerate(g.logits):
        assert_rel_close(step_logits, full[:, 8 + i], 1e-5, name=f"step {i}")


@pytest.mark.parametrize("kind", ["hebbian", "bsbr"])
def test_converted_model_trains(kind):
    model = tiny("gpt2").train()
    convert(model, kind, chunk_size=16 if kind == "hebbian" else 4)
    ids = torch.randint(0, V, (2, 20))
    model(ids, labels=ids).loss.backward()
    attn = model.transformer.h[0].attn
    for p in (attn.c_attn.weight, attn.c_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_save_and_reload_keeps_conversion(tmp_path):
    model = convert(tiny("llama"), "bsbr", chunk_size=4, top_k=1)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="bsbr").eval()
    assert loaded.config.bsbr_chunk_size == 4 and loaded.config.bsbr_top_k == 1
    convert(loaded, "bsbr")                       # options come from the saved config
    assert loaded.config.bsbr_chunk_size == 4
    ids = torch.randint(1, V, (1, 7))
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))


def test_errors():
    with pytest.raises(TypeError, match="model"):
        convert(torch.nn.Linear(2, 2), "bsbr")
    with pytest.raises(ValueError, match="kind"):
        convert(tiny("gpt2"), "mamba")
    with pytest.raises(TypeError, match="top_k"):
        convert(tiny("gpt2"), "hebbian", top_k=2)          # a BSBR option for Hebbian
    with pytest.raises(ValueError, match="bsbr_chunk_size"):
        convert(tiny("gpt2"), "bsbr", chunk_size=0)
    with pytest.raises(ValueError, match="hebbian_feature_map"):
        convert(tiny("gpt2"), "hebbian", feature_map="softmax")
    cross = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=1,
                                       n_head=2, add_cross_attention=True))
    with pytest.raises(ValueError, match="cross-attention"):
        convert(cross, "bsbr")


def _frozen(model):
    return snapshot(model), model.config.to_dict(), dict(vars(model))


def _assert_unchanged(model, before):
    sd, cfg, attributes = before
    after = model.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)
    assert model.config.to_dict() == cfg
    assert vars(model) == attributes                 # no generate hook installed on the instance


@pytest.mark.parametrize("kind,opts,error,match", [
    ("hebbian", dict(eps=float("nan")), ValueError, "hebbian_eps"),
    ("hebbian", dict(eps=-1e9), ValueError, "hebbian_eps"),
    ("hebbian", dict(eps="x"), TypeError, "hebbian_eps"),
    ("hebbian", dict(chunk_size=17), ValueError, "hebbian_chunk_size"),
    ("hebbian", dict(feature_map="elu", backend="tritn"), ValueError, "hebbian_backend"),
    ("bsbr", dict(chunk_size=8, backend="cuda"), ValueError, "bsbr_backend"),
    ("bsbr", dict(chunk_size=512, backend="triton"), ValueError, "bsbr_chunk_size"),
    ("bsbr", dict(top_k=2, bank=[1, 2]), ValueError, "bsbr_bank"),
    ("bsbr", dict(chunk_size=4, topk=2), TypeError, "topk"),
])
def test_a_failed_convert_changes_nothing(kind, opts, error, match):
    """Every option is checked before anything changes: the weights, the config (options and
    attention implementation) and generate's cache hook are exactly as before."""
    model = tiny("llama")
    before = _frozen(model)
    with pytest.raises(error, match=match):
        convert(model, kind, **opts)
    _assert_unchanged(model, before)
    assert model.config._attn_implementation not in ("hebbian", "bsbr")


def test_an_option_already_in_the_config_is_checked_too():
    model = tiny("gpt2")
    model.config.hebbian_eps = float("nan")            # e.g. a hand-edited saved config
    before = _frozen(model)
    with pytest.raises(ValueError, match="config.hebbian_eps"):
        convert(model, "hebbian", feature_map="relu")
    _assert_unchanged(model, before)


def test_a_model_it_cannot_serve_is_refused_before_any_change():
    from transformers import BertConfig, BertForMaskedLM
    bert = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=20)).eval()
    before = _frozen(bert)
    with pytest.raises(ValueError, match="bidirectional attention"):
        convert(bert, "bsbr", chunk_size=4)
    _assert_unchanged(bert, before)
    with pytest.raises(ValueError, match="bidirectional attention"):
        convert(bert, "hebbian", recurrent_cache=False)
    _assert_unchanged(bert, before)


def test_a_failure_while_swapping_restores_the_config(monkeypatch):
    """If transformers itself fails half-way through set_attn_implementation, the config's
    options and attention implementation are put back."""
    model = tiny("gpt2")
    before = _frozen(model)
    real = type(model).set_attn_implementation

    def half_way(self, name, *args, **kwargs):
        real(self, name, *args, **kwargs)
        raise RuntimeError("a submodule refused")

    monkeypatch.setattr(type(model), "set_attn_implementation", half_way)
    with pytest.raises(RuntimeError, match="refused"):
        convert(model, "bsbr", chunk_size=4, top_k=1)
    _assert_unchanged(model, before)

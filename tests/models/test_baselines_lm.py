"""The generic mixer LM: protocol, streaming and generate equivalence for every mixer."""
import importlib

import pytest
import torch
from helpers import assert_rel_close

from baselines import MIXERS, MixerLM, MixerLMConfig, MixerLMState, build_mixer

KWARGS = {"softmax": {}, "linear": {"chunk_size": 16}, "sliding": {"window": 6, "block_size": 8},
          "deltanet": {"chunk_size": 16}, "bdh": {"n_neurons": 32}, "bsbr": {"chunk_size": 8}}


def _bsbr_available():
    try:
        return hasattr(importlib.import_module("bsbr"), "BSBRAttention")
    except ImportError:
        return False


def _mixers():
    out = []
    for m in MIXERS:
        marks = []
        if m == "bsbr":
            marks = [pytest.mark.skipif(not _bsbr_available(),
                                        reason="bsbr.BSBRAttention is not built yet")]
        out.append(pytest.param(m, marks=marks))
    return out


def tiny(mixer, **kw):
    cfg = MixerLMConfig(mixer=mixer, n_layer=2, d_model=32, n_head=2,
                        mixer_kwargs=dict(KWARGS[mixer]), **kw)
    return MixerLM(cfg).eval()


@pytest.mark.parametrize("short_conv", [0, 4])
@pytest.mark.parametrize("mixer", _mixers())
def test_streaming_pieces_equal_one_call(mixer, short_conv):
    model = tiny(mixer, short_conv=short_conv)
    idx = torch.randint(0, 256, (2, 29))
    full, _ = model(idx)
    state, pieces = None, []
    for a, b in [(0, 1), (1, 12), (12, 13), (13, 29)]:
        logits, state = model(idx[:, a:b], state=state, return_state=True)
        pieces.append(logits)
    assert_rel_close(torch.cat(pieces, 1), full, 1e-5)
    assert isinstance(state, MixerLMState) and state.position == 29 and state.nbytes() > 0


@pytest.mark.parametrize("mixer", _mixers())
def test_greedy_generate_equals_rerunning_the_prefix(mixer):
    model = tiny(mixer)
    idx = torch.randint(0, 256, (2, 7))
    out = model.generate(idx, 6, top_k=1)
    seq = idx
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("short_conv", [0, 3])
@pytest.mark.parametrize("mixer", _mixers())
def test_causality_and_loss(mixer, short_conv):
    model = tiny(mixer, short_conv=short_conv)
    idx = torch.randint(0, 256, (1, 20))
    t = 11
    idx2 = idx.clone()
    idx2[0, t] = (idx2[0, t] + 1) % 256
    a, _ = model(idx)
    b, _ = model(idx2)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])
    tgt = torch.randint(0, 256, (1, 20))
    logits, loss = model(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1))
    assert_rel_close(loss, ref, 1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_models_differ_only_in_the_mixer():
    counts = {}
    for m in ("softmax", "linear", "sliding"):
        model = tiny(m)
        mixer_params = sum(p.numel() for b in model.blocks for p in b.mixer.parameters())
        counts[m] = model.num_params() - mixer_params
    assert len(set(counts.values())) == 1
    tied, untied = tiny("softmax"), tiny("softmax", tie_weights=False)
    assert untied.num_params() - tied.num_params() == 256 * 32


def test_sampled_generate_is_reproducible_with_a_generator():
    model = tiny("deltanet")
    idx = torch.randint(0, 256, (1, 4))
    a, b = (model.generate(idx, 5, temperature=0.8, top_k=20,
                           generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (1, 9)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mixer"):
        MixerLMConfig(mixer="mamba")
    with pytest.raises(ValueError, match="n_layer"):
        MixerLMConfig(n_layer=0)
    with pytest.raises(ValueError, match="mixer"):
        build_mixer("rnn", 32, 2)
    model = tiny("linear")
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="state"):
        model(torch.zeros(1, 4, dtype=torch.long), state=MixerLMState([None]))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)


@pytest.mark.parametrize("mixer", ["softmax", "bdh"])
def test_features_are_what_the_head_reads(mixer):
    """features(idx) → head equals the forward's logits, and also the stateful path's: a caller
    can score only some rows (long_range trains on the answer rows this way)."""
    model = tiny(mixer)
    idx = torch.randint(0, 256, (2, 19))
    h = model.features(idx)
    assert h.shape == (2, 19, 32)
    logits, _ = model(idx)
    logits_st, _ = model(idx, return_state=True)
    assert_rel_close(model.head(h), logits, 1e-6)
    assert_rel_close(logits_st, logits, 1e-5)
    with pytest.raises((TypeError, ValueError)):
        model.features(torch.full((1, 3), 999))

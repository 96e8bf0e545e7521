"""The tuned GPT-2 decode (StaticCache + pinned SDPA backend) gives the plain loop's tokens."""
import warnings

import pytest
import torch
from helpers import assert_rel_close

from baselines import GPT2LM, gpt2_config
from baselines.gpt2_decode import GPT2StaticDecoder, cache_argument, make_static_cache


def _tiny(attn="sdpa"):
    return GPT2LM(gpt2_config(2, 32, 2, n_positions=64, dropout=0.0,
                              attn_implementation=attn)).eval()


@pytest.mark.parametrize("attn,backend", [("sdpa", "auto"), ("sdpa", "math"), ("eager", None)])
def test_static_greedy_equals_dynamic_greedy(attn, backend):
    model = _tiny(attn)
    idx = torch.randint(0, 256, (2, 9))
    plain = model.generate(idx, 12, top_k=1, cache="dynamic")
    tuned = model.generate(idx, 12, top_k=1, cache="static", sdpa_backend=backend)
    assert torch.equal(tuned, plain)
    assert tuned.shape == (2, 21)


def test_static_cache_logits_match_full_forward():
    """Each static-cache step's logits equal the full forward's at that position."""
    model = _tiny()
    idx = torch.randint(0, 256, (2, 15))
    full, _ = model(idx)
    dec = GPT2StaticDecoder(model.hf, sdpa_backend="math")
    cache = make_static_cache(model.hf, 2, 15)
    with torch.no_grad():
        steps = [dec._call(model.hf, idx[:, :6], cache, 0)]
        for t in range(6, 15):
            steps.append(dec._call(model.hf, idx[:, t:t + 1], cache, t))
    assert_rel_close(torch.cat(steps, 1), full, 1e-5)


def test_plain_path_uses_the_current_cache_names(caplog):
    model = _tiny()
    assert cache_argument(model.hf) in ("cache", "past_key_values")
    idx = torch.randint(0, 256, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)      # no deprecated cache argument
        _, state = model(idx, return_state=True)
    assert "deprecated" not in caplog.text                  # nor the deprecated output field
    assert state.nbytes() == 2 * 2 * 1 * 5 * 32 * 4


def test_bad_arguments_raise():
    model = _tiny()
    idx = torch.randint(0, 256, (1, 5))
    with pytest.raises(ValueError, match="cache"):
        model.generate(idx, 2, cache="paged")
    with pytest.raises(ValueError, match="sdpa_backend"):
        model.generate(idx, 2, cache="static", sdpa_backend="fast")
    with pytest.raises(ValueError, match="n_positions"):
        model.generate(idx, 60, cache="static")

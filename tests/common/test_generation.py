"""glassbrain.generation (the checks every generate shares) and sampling at extreme
temperatures, for every language model here."""
import pytest
import torch

from glassbrain.generation import check_generate_args
from glassbrain.sampling import sample_next


def make(name):
    from baselines import GPT2LM, MixerLM, MixerLMConfig, gpt2_config
    from bdh import BDH, BDHConfig
    from bsbr import BSBRLM, BSBRLMConfig
    return {"bdh": lambda: BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2,
                                         mlp_internal_dim_multiplier=4, dropout=0.0)),
            "bsbr": lambda: BSBRLM(BSBRLMConfig(n_layer=1, d_model=32, n_head=2, chunk_size=4)),
            "mixer": lambda: MixerLM(MixerLMConfig(n_layer=1, d_model=32, n_head=2)),
            "gpt2": lambda: GPT2LM(gpt2_config(1, 32, 2, vocab_size=256, n_positions=32))}[
        name]().eval()


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-300])
def test_a_tiny_temperature_samples_the_maximum(temperature):
    """A temperature far below float32's range (it once made inf − inf = NaN in multinomial)
    picks each row's largest logit, as greedy decoding does."""
    logits = torch.randn(5, 37) * 3
    out = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, logits.argmax(-1, keepdim=True))
    tied = torch.zeros(1, 8)
    tied[0, [2, 5]] = 1.0
    picks = {int(sample_next(tied, temperature)) for _ in range(40)}
    assert picks == {2, 5}                                  # only the tied maxima, both drawn


def test_a_huge_temperature_is_nearly_uniform():
    logits = torch.randn(1, 4) * 5
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([sample_next(logits, 1e300, generator=g) for _ in range(400)])
    counts = torch.bincount(draws.view(-1), minlength=4)
    assert counts.min() > 60                                 # 100 each expected


@pytest.mark.parametrize("name", ["bdh", "bsbr", "mixer", "gpt2"])
def test_every_generate_takes_any_finite_temperature(name):
    model = make(name)
    idx = torch.randint(0, 256, (2, 5))
    out = model.generate(idx, 4, temperature=1e-45)
    assert torch.equal(out, model.generate(idx, 4, top_k=1))
    assert torch.equal(model.generate(idx, 4, seed=3), model.generate(idx, 4, seed=3))


@pytest.mark.parametrize("name", ["bdh", "bsbr", "mixer", "gpt2"])
@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (-1.0, ValueError),
                                     (float("nan"), ValueError), (float("inf"), ValueError),
                                     (True, TypeError), ("0.5", TypeError)])
def test_every_generate_refuses_a_bad_temperature(name, bad, err):
    model = make(name)
    with pytest.raises(err, match="temperature: expected a finite number > 0"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=bad)


@pytest.mark.parametrize("name", ["bdh", "bsbr", "mixer", "gpt2"])
def test_every_generate_checks_the_same_arguments(name):
    model = make(name)
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens: expected an int >= 0"):
        model.generate(idx, -1)
    with pytest.raises(ValueError, match="top_k: expected None or an int >= 1"):
        model.generate(idx, 2, top_k=0)
    with pytest.raises(ValueError, match="generator, seed: pass at most one"):
        model.generate(idx, 2, generator=torch.Generator(), seed=1)
    with pytest.raises(ValueError, match=r"idx: expected device meta \(the model's\)"):
        check_generate_args(idx, "meta", 2)

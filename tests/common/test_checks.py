"""glassbrain.checks.next_token_loss: the one loss of every language model here."""
import pytest
import torch

from glassbrain.checks import next_token_loss


def test_next_token_loss_is_the_float32_cross_entropy():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    targets = torch.randint(0, 7, (2, 5))
    ref = torch.nn.functional.cross_entropy(logits.double().view(-1, 7), targets.view(-1))
    loss = next_token_loss(logits, targets)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-6


@pytest.mark.parametrize("bad", [torch.zeros(2, 4, dtype=torch.long), [[0] * 5] * 2, None])
def test_next_token_loss_refuses_targets_of_another_shape(bad):
    with pytest.raises(ValueError, match=r"targets: expected a tensor of shape \[B,T\] = \[2, 5\]"):
        next_token_loss(torch.randn(2, 5, 7), bad)


@pytest.mark.parametrize("make", ["bdh", "bsbr", "mixer", "gpt2"])
def test_every_lm_checks_its_targets(make):
    from baselines import GPT2LM, MixerLM, MixerLMConfig, gpt2_config
    from bdh import BDH, BDHConfig
    from bsbr import BSBRLM, BSBRLMConfig
    model = {"bdh": lambda: BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2,
                                          mlp_internal_dim_multiplier=4)),
             "bsbr": lambda: BSBRLM(BSBRLMConfig(n_layer=1, d_model=32, n_head=2, chunk_size=4)),
             "mixer": lambda: MixerLM(MixerLMConfig(n_layer=1, d_model=32, n_head=2)),
             "gpt2": lambda: GPT2LM(gpt2_config(1, 32, 2, vocab_size=256, n_positions=16))}[make]()
    model.eval()
    idx = torch.randint(0, 256, (2, 6))
    logits, loss = model(idx, torch.randint(0, 256, (2, 6)))
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="targets"):
        model(idx, torch.randint(0, 256, (2, 5)))
    # one token-id check everywhere: int32 ids are the same ids, out-of-range ones are refused
    assert torch.equal(model(idx.int())[0], model(idx)[0])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=256\)"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4))

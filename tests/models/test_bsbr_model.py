"""BSBRLM on the model protocol: causality, streaming, generate from the state, errors."""
import pytest
import torch

from helpers import assert_rel_close, run_pieces
from bsbr import BankConfig, BSBRLM, BSBRLMConfig, BSBRLMState
import bsbr.attention as attention_mod


def tiny(**kw):
    cfg = dict(n_layer=2, d_model=24, n_head=3, chunk_size=4, top_k=2, meta_dim=5)
    cfg.update(kw)
    return BSBRLM(BSBRLMConfig(**cfg)).double().eval()


def test_forward_loss_and_backward():
    model = tiny().float().train()
    idx = torch.randint(0, 256, (2, 21))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 21, 256) and loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5    # near-uniform init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model(idx)[1] is None


def test_causal_at_every_position():
    model = tiny()
    T = 15
    idx = torch.randint(0, 256, (2, T))
    logits, _ = model(idx)
    for t in range(T):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1 + torch.randint(0, 255, (2,))) % 256
        lg2, _ = model(idx2)
        assert torch.equal(lg2[:, :t], logits[:, :t]), f"token {t} leaks into the past"
        assert not torch.allclose(lg2[:, t], logits[:, t]), f"token {t} does not see itself"


@pytest.mark.parametrize("bank", [None, BankConfig(slots_per_level=(16, 2, 1))])
def test_streaming_pieces_and_token_by_token_equal_one_call(bank):
    model = tiny(bank=bank)
    idx = torch.randint(0, 256, (2, 31))
    logits, _ = model(idx)
    for cuts in ([0, 1, 5, 12, 13, 30, 31], list(range(32))):
        with torch.no_grad():
            lg, st = run_pieces(model, idx, cuts)
        assert_rel_close(lg, logits, 1e-12)
        assert isinstance(st, BSBRLMState) and st.position == 31 and len(st.layers) == 2
    logits_t, loss_t, st = model(idx[:, :9], idx[:, :9], state=None, return_state=True)
    assert loss_t.ndim == 0 and st.position == 9


def test_greedy_generate_equals_full_rerun_argmax():
    model = tiny()
    prompt = torch.randint(0, 256, (2, 6))
    out = model.generate(prompt, 14, top_k=1)
    ref = prompt
    with torch.no_grad():
        for _ in range(14):
            logits, _ = model(ref)
            ref = torch.cat([ref, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


def test_generate_uses_the_state(monkeypatch):
    """After the prompt, every model call is a single token (the prefix is never re-run), and
    generate → continue from the returned state equals one longer generate."""
    model = tiny(bank=BankConfig(slots_per_level=(2, 2, 1)))
    prompt = torch.randint(0, 256, (1, 9))
    lengths = []
    real = attention_mod.BSBRAttention.forward

    def spy(self, x, state=None, return_state=False):
        lengths.append(x.shape[1])
        return real(self, x, state, return_state)

    monkeypatch.setattr(attention_mod.BSBRAttention, "forward", spy)
    out = model.generate(prompt, 10, top_k=1, prefill_chunk=4)
    assert lengths == [4, 4, 4, 4, 1, 1] + [1, 1] * 9      # 2 layers; prompt in 3 pieces
    monkeypatch.undo()
    first, st = model.generate(prompt, 4, top_k=1, return_state=True)
    assert st.position == 9 + 3
    rest = model.generate(first[:, -1:], 6, top_k=1, state=st)
    assert torch.equal(torch.cat([first, rest[:, 1:]], 1), out)


def test_sampling_is_reproducible_and_in_range():
    model = tiny()
    prompt = torch.randint(0, 256, (3, 5))
    a = model.generate(prompt, 8, temperature=0.8, top_k=20,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=0.8, top_k=20,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 13) and torch.equal(a[:, :5], prompt)
    assert int(a.min()) >= 0 and int(a.max()) < 256


def test_bad_input_raises_clearly():
    model = tiny()
    with pytest.raises(TypeError, match="idx: expected token ids of dtype torch.long"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"idx: expected 2 dims \[B,T\], got shape \[5\]"):
        model(torch.randint(0, 256, (5,)))
    with pytest.raises(ValueError, match=r"vocab_size=256.*\[0, 256\]"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match=r"expected B >= 1 and T >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="idx: expected a torch.Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match="targets: expected a tensor of shape"):
        model(torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 4)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.randint(0, 256, (1, 3)), -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.randint(0, 256, (1, 3)), 2, temperature=0)
    _, st = model(torch.randint(0, 256, (2, 5)), return_state=True)
    with pytest.raises(ValueError, match="batch size 3"):
        model(torch.randint(0, 256, (3, 2)), state=st)
    with pytest.raises(ValueError, match="different configuration"):
        tiny(chunk_size=8)(torch.randint(0, 256, (2, 2)), state=st)
    with pytest.raises(ValueError, match="BSBRLMConfig.d_model: expected a multiple of n_head"):
        BSBRLMConfig(d_model=25, n_head=3)
    with pytest.raises(ValueError, match="BSBRLMConfig.top_k"):
        BSBRLMConfig(top_k=0)


@pytest.mark.parametrize("bad", [0, -2.0, True, "0.1", float("nan")])
def test_config_rejects_a_bad_long_scale(bad):
    with pytest.raises(ValueError, match="BSBRLMConfig.long_scale"):
        BSBRLMConfig(long_scale=bad)

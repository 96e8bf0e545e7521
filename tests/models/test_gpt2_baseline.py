"""GPT-2 baseline: protocol, streaming, causality, parameter matching."""
import pytest
import torch

from baselines import GPT2LM, gpt2_config, gpt2_param_count, match_gpt2_config


def _tiny():
    return GPT2LM(gpt2_config(2, 32, 2, n_positions=64, dropout=0.0)).eval()


def test_param_count_formula_matches_model():
    for n_layer, d, pos in [(2, 32, 64), (3, 64, 100)]:
        model = GPT2LM(gpt2_config(n_layer, d, 2, n_positions=pos))
        assert model.num_params() == gpt2_param_count(n_layer, d, 256, pos)


def test_match_config_is_closest_width():
    target = 25_000_000
    c = match_gpt2_config(target, n_positions=512)
    got = gpt2_param_count(c.n_layer, c.n_embd, 256, 512)
    for d in (c.n_embd - 64, c.n_embd + 64):
        assert abs(got - target) <= abs(gpt2_param_count(c.n_layer, d, 256, 512) - target)


def test_streaming_pieces_equal_one_call():
    model = _tiny()
    idx = torch.randint(0, 256, (2, 41))
    full, _ = model(idx)
    logits, state, pieces = None, None, []
    for a, b in [(0, 1), (1, 17), (17, 18), (18, 41)]:
        logits, state = model(idx[:, a:b], state=state, return_state=True)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert state.position == 41
    # The KV cache grows with context: 2 layers × (k, v) × B × T × d × 4 bytes.
    assert state.nbytes() == 2 * 2 * 2 * 41 * 32 * 4


def test_causality_perturbation():
    model = _tiny()
    idx = torch.randint(0, 256, (1, 30))
    t = 12
    idx2 = idx.clone()
    idx2[0, t] = (idx2[0, t] + 1) % 256
    a, _ = model(idx)
    b, _ = model(idx2)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_loss_is_cross_entropy_of_given_targets():
    model = _tiny()
    idx = torch.randint(0, 256, (2, 9))
    tgt = torch.randint(0, 256, (2, 9))
    logits, loss = model(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_greedy_generate_uses_cache_and_matches_argmax():
    model = _tiny()
    idx = torch.randint(0, 256, (1, 5))
    out = model.generate(idx, 6, top_k=1)
    seq = idx
    for _ in range(6):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_bad_inputs_raise():
    model = _tiny()
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(TypeError, match="idx"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=0)

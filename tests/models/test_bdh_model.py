"""BDH model: official-format equivalence, gradients, causality, probes, input validation.

The oracle is `bdh.naive`, our own plain-PyTorch transcription of the official BDH forward,
written from the BDH layer's math: dense scores with tril(-1), RoPE from float64
phases, everything in float64. It shares no code with the rest of the `bdh` package.
"""

import pytest
import torch
import torch.nn.functional as F

from bdh import BDH, BDHConfig, BDHState, SparsityProbe
from bdh.naive import official_forward as oracle_forward
from bdh.naive import official_state_dict
from helpers import assert_rel_close

SMALL = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, vocab_size=256)


def make_model(seed=0, chunk_size=16, **overrides):
    cfg = dict(SMALL, dropout=0.0, backend="torch", chunk_size=chunk_size)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = BDH(BDHConfig(**cfg)).eval()
    sd = official_state_dict(**{k: cfg[k] for k in SMALL})
    model.load_state_dict(sd)
    return model, sd


# ----------------------------------------------------------------------------- equivalence

def test_config_defaults_are_official():
    c = BDHConfig()
    assert (c.n_layer, c.n_embd, c.n_head, c.mlp_internal_dim_multiplier, c.vocab_size,
            c.dropout) == (6, 256, 4, 128, 256, 0.1)
    assert c.N == 8192 and c.backend == "auto" and c.chunk_size is None
    assert c.gradient_checkpointing is False


def test_parameter_names_and_shapes_are_official():
    model = BDH(BDHConfig(**SMALL))
    want = {k: tuple(v.shape) for k, v in official_state_dict(**SMALL).items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    # The buffer holds the official float32 frequencies bit for bit.
    assert torch.equal(model.state_dict()["attn.freqs"], official_state_dict(**SMALL)["attn.freqs"])


@pytest.mark.parametrize("B,T", [(1, 1), (2, 45)])
def test_official_state_dict_gives_official_logits_and_loss(B, T):
    model, sd = make_model()
    idx = torch.randint(0, 256, (B, T))
    targets = torch.randint(0, 256, (B, T))
    ref = oracle_forward(sd, idx, SMALL["n_layer"])
    with torch.no_grad():
        logits, loss = model(idx, targets)
        logits2, none = model(idx)
    assert none is None and logits.dtype == torch.float32
    assert_rel_close(logits, ref, 1e-4, "logits")
    assert torch.equal(logits, logits2)
    ref_loss = F.cross_entropy(ref.view(-1, ref.shape[-1]), targets.view(-1))
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())


def test_gradients_match_the_oracle():
    model, sd = make_model()
    idx = torch.randint(0, 256, (2, 40))
    targets = torch.randint(0, 256, (2, 40))
    _, loss = model(idx, targets)
    loss.backward()
    leaves = {k: v.double().requires_grad_(True) for k, v in sd.items() if k != "attn.freqs"}
    ref = oracle_forward({**leaves, "attn.freqs": sd["attn.freqs"]}, idx, SMALL["n_layer"])
    F.cross_entropy(ref.view(-1, ref.shape[-1]), targets.view(-1)).backward()
    params = dict(model.named_parameters())
    for name, leaf in leaves.items():
        assert_rel_close(params[name].grad, leaf.grad, 1e-4, f"grad {name}")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model, sd = make_model()
    ckpt, _ = make_model(gradient_checkpointing=True)
    model.train(), ckpt.train()
    idx = torch.randint(0, 256, (2, 33))
    _, l1 = model(idx, idx)
    _, l2 = ckpt(idx, idx)
    l1.backward(), l2.backward()
    assert torch.allclose(l1, l2, rtol=1e-6, atol=0)
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert_rel_close(q.grad, p.grad, 1e-5, f"grad {n}")


# ----------------------------------------------------------------------------- causality

def test_causality_perturbation():
    model, _ = make_model()
    T, t = 40, 23                   # t inside the second chunk of 16
    idx = torch.randint(0, 256, (2, T))
    other = idx.clone()
    other[:, t] = (idx[:, t] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(other)
    assert (a[:, :t] - b[:, :t]).abs().max() <= 1e-6
    moved = (a[:, t:] - b[:, t:]).abs().amax(dim=-1)                  # [B, T - t]
    assert (moved > 1e-4).all(), "every position from t on must see the change"


# ----------------------------------------------------------------------------- probes

def test_probe_densities_and_kept_activations_match_a_direct_computation():
    model, sd = make_model()
    idx = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        plain, _ = model(idx)
    nh, N = model.config.n_head, model.config.N
    keep = [0, 5, N - 1, N, nh * N - 1]
    with torch.no_grad(), SparsityProbe(model, keep={"xy": keep, "xs": [3]}) as probe:
        probed, _ = model(idx)
    assert torch.equal(plain, probed), "a probe must not change the outputs"
    assert model._probe is None

    record = []
    oracle_forward(sd, idx, SMALL["n_layer"], record=record)
    dens = probe.densities()
    assert len(dens) == SMALL["n_layer"]
    for layer, (xs, ys, xy) in enumerate(record):
        for kind, t in (("xs", xs), ("ys", ys), ("xy", xy)):
            d = dens[layer][kind]
            assert 0.0 <= d <= 1.0
            assert abs(d - (t > 0).double().mean().item()) < 2e-3, (layer, kind)
        flat = xy.transpose(1, 2).reshape(2, 30, nh * N)                 # decoder row order
        got = probe.activations[(layer, "xy")]
        assert got.shape == (2, 30, len(keep))
        assert_rel_close(got, flat[..., keep], 1e-4, f"kept xy, layer {layer}")
        assert probe.activations[(layer, "xs")].shape == (2, 30, 1)
    # Densities are not trivially 0 or 1 at random init.
    assert 0.2 < dens[0]["xs"] < 0.8


def test_probe_appends_over_streamed_calls_and_rejects_bad_indices():
    model, _ = make_model()
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad(), SparsityProbe(model, keep={"ys": [1, 2]}) as whole:
        model(idx)
    with torch.no_grad(), SparsityProbe(model, keep={"ys": [1, 2]}) as pieces:
        _, st = model(idx[:, :5], return_state=True)
        _, st = model(idx[:, 5:6], state=st, return_state=True)     # the decoding step path
        model(idx[:, 6:], state=st)
    assert pieces.activations[(1, "ys")].shape == (1, 12, 2)
    assert_rel_close(pieces.activations[(1, "ys")], whole.activations[(1, "ys")], 1e-5)
    for a, b in zip(pieces.densities(), whole.densities()):
        for k in a:
            assert abs(a[k] - b[k]) < 1e-9
    with pytest.raises(ValueError, match="neuron indices"):
        SparsityProbe(model, keep={"xy": [model.config.n_head * model.config.N]})
    with pytest.raises(ValueError, match="keys must be"):
        SparsityProbe(model, keep={"zz": [0]})


# ----------------------------------------------------------------------------- bad inputs

def test_bad_token_ids_raise_clearly():
    model, _ = make_model()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="token ids must lie"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="dtype torch.long"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"2 dims \[B,T\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_state_from_another_config_or_batch_raises_clearly():
    model, _ = make_model()
    other, _ = make_model(n_head=4)
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        _, st = other(idx, return_state=True)
        with pytest.raises(ValueError, match="different configuration.*n_head: state has 4"):
            model(idx, state=st)
        _, st2 = model(idx, return_state=True)
        with pytest.raises(ValueError, match=r"expected shape \[B,nh,N,D\] = \[1, "):
            model(idx[:1], state=st2)
        with pytest.raises(TypeError, match="BDHState"):
            model(idx, state=st2.layers)
        with pytest.raises(TypeError, match="float32"):
            BDHState([s.double() for s in st2.layers], 8)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(n_head=3), ValueError, "divisible by n_head"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(chunk_size=24), ValueError, "power of two"),
    (dict(n_layer=0), ValueError, "n_layer"),
    (dict(n_embd=32.0), TypeError, "n_embd"),
    (dict(n_embd=1, n_head=1, mlp_internal_dim_multiplier=1), ValueError, "even"),
])
def test_config_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        BDHConfig(**kwargs)

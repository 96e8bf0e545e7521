"""BDHAttention's untied ablations (query_encoder: q ≠ k; value_proj: v = x W_v): a float64
oracle, the tied module as the special case, streaming, gradients, state refusals."""
import pytest
import torch
import torch.nn.functional as F

from bdh import BDHAttention
from helpers import assert_rel_close

D, NH, N = 24, 3, 20


def make_attn(query_encoder=False, value_proj=False, rope=True):
    torch.manual_seed(0)
    attn = BDHAttention(D, NH, N, backend="torch", chunk_size=16, rope=rope,
                        query_encoder=query_encoder, value_proj=value_proj)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.2)
    return attn


def oracle(attn, x):
    """Dense float64: q = RoPE(relu(x enc_q)), k = RoPE(relu(x enc)), v = x W_v (or x),
    strictly causal scores, LN per head, W_o. The rotation is the module's own (tested against
    its formula in test_bdh_attention)."""
    x = x.double()
    B, T, _ = x.shape
    x1 = x.unsqueeze(1)
    enc_q = attn.encoder if attn.encoder_q is None else attn.encoder_q
    k = attn.attn.rotate(torch.relu(x1 @ attn.encoder.detach().double()))
    q = attn.attn.rotate(torch.relu(x1 @ enc_q.detach().double()))
    v = x1 if attn.W_v is None else x1 @ attn.W_v.weight.detach().double().T
    a = F.layer_norm((q @ k.mT).tril(-1) @ v, (D,))
    return a.transpose(1, 2).reshape(B, T, NH * D) @ attn.out_proj.weight.detach().double().T


@pytest.mark.parametrize("query_encoder,value_proj", [(True, False), (False, True), (True, True)])
def test_untied_module_equals_the_oracle(query_encoder, value_proj):
    attn = make_attn(query_encoder, value_proj)
    x = torch.randn(2, 37, D)
    y = attn(x)
    assert_rel_close(y, oracle(attn, x), 1e-4, "untied BDHAttention")
    y.square().sum().backward()
    untied = [attn.encoder_q] if query_encoder else []
    untied += [attn.W_v.weight] if value_proj else []
    for p in [attn.encoder, *untied]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_tied_weights_give_the_tied_module():
    """encoder_q = encoder and W_v = I: the untied module computes BDH's attention."""
    tied, untied = make_attn(), make_attn(True, True)
    with torch.no_grad():
        untied.encoder.copy_(tied.encoder)
        untied.encoder_q.copy_(tied.encoder)
        untied.W_v.weight.copy_(torch.eye(D))
        untied.out_proj.weight.copy_(tied.out_proj.weight)
    x = torch.randn(2, 29, D)
    assert_rel_close(untied(x), tied(x), 1e-6, "untied with tied weights")
    assert make_attn().encoder_q is None and make_attn().W_v is None       # off by default


def test_untied_streaming_equals_one_call():
    """Pieces and single tokens (the decoding step, which reads q and k separately) equal one
    call; the state keeps its shape and refuses a tied module."""
    attn = make_attn(True, True)
    x = torch.randn(2, 40, D)
    with torch.no_grad():
        full = attn(x)
        state, ys = None, []
        for a, b in zip([0, 7, 8, 9, 10, 26], [7, 8, 9, 10, 26, 40]):
            out, state = attn(x[:, a:b], state=state, return_state=True)
            ys.append(out)
    assert_rel_close(torch.cat(ys, 1), full, 1e-5, "streamed untied")
    assert state.layers[0].shape == (2, NH, N, D)
    with pytest.raises(ValueError, match="different configuration"):
        make_attn()(x[:, :3], state=state)
    with pytest.raises(ValueError, match="query_encoder: expected True or False"):
        BDHAttention(D, NH, N, query_encoder=1)
    with pytest.raises(ValueError, match="value_proj: expected True or False"):
        BDHAttention(D, NH, N, value_proj="yes")


def test_untied_query_is_causal_and_reaches_later_positions():
    attn = make_attn(True, False)
    x = torch.randn(2, 30, D)
    x2 = x.clone()
    x2[:, 13] += torch.randn(2, D)
    with torch.no_grad():
        a, b = attn(x), attn(x2)
    assert (a[:, :13] - b[:, :13]).abs().max() <= 1e-6
    assert ((a[:, 13:] - b[:, 13:]).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("untie,query,value", [("none", False, False), ("q", True, False),
                                               ("v", False, True), ("qv", True, True)])
def test_long_range_reaches_the_ablation(untie, query, value):
    """`python -m experiments.long_range --hebbian-untie` builds the bdh mixer with it."""
    from experiments import long_range
    cfg = long_range.config_from_args(["--mixers", "bdh", "--hebbian-untie", untie,
                                       "--d-model", "16", "--hebbian-neurons", "8"])
    model = long_range.build_model(cfg, "bdh")
    for blk in model.blocks:
        assert (blk.mixer.encoder_q is not None) == query
        assert (blk.mixer.W_v is not None) == value

"""bsbr.mha.RecurrentMultiheadAttention: an nn.MultiheadAttention-shaped causal attention."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close
from torch import nn

from bsbr.mha import RecurrentMultiheadAttention as RMHA

E, NH = 20, 4


def causal_mask(T):
    return nn.Transformer.generate_square_subsequent_mask(T)


@pytest.mark.parametrize("batch_first", [True, False])
def test_bsbr_one_chunk_equals_multihead_attention(batch_first):
    mha = nn.MultiheadAttention(E, NH, batch_first=batch_first)
    x = torch.randn(2, 13, E, requires_grad=True)
    xin = x if batch_first else x.transpose(0, 1)
    ref, _ = mha(xin, xin, xin, attn_mask=causal_mask(13), need_weights=False)
    attn = RMHA.from_mha(mha, "bsbr", chunk_size=16)
    out, w = attn(xin, xin, xin, attn_mask=causal_mask(13))
    assert w is None
    assert_rel_close(out, ref, 1e-5)
    do = torch.randn_like(out)
    g_out = torch.autograd.grad((out * do).sum(), [x, *attn.parameters()])
    g_ref = torch.autograd.grad((ref * do).sum(), [x, *(p for n, p in mha.named_parameters())])
    for a, b in zip(g_out, g_ref):
        assert_rel_close(a, b, 1e-4)


def test_inside_transformer_encoder_layer():
    layer = nn.TransformerEncoderLayer(E, NH, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 11, E)
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            ref = layer(x, src_mask=causal_mask(11), is_causal=True)
            swapped = nn.TransformerEncoderLayer(E, NH, dim_feedforward=32, dropout=0.0,
                                                 batch_first=True).train(training)
            swapped.load_state_dict(layer.state_dict())
            swapped.self_attn = RMHA.from_mha(swapped.self_attn, "bsbr", chunk_size=16)
            out = swapped(x, src_mask=causal_mask(11), is_causal=True)
        assert_rel_close(out, ref, 1e-5)


@pytest.mark.parametrize("kind", ["bsbr", "hebbian"])
def test_causal_and_streaming(kind):
    attn = RMHA(E, NH, kind, chunk_size=4, batch_first=True)
    x = torch.randn(2, 14, E)
    y, _ = attn(x, x, x)
    x2 = x.clone()
    x2[:, 6] += 1.0
    y2, _ = attn(x2, x2, x2)
    assert torch.equal(y[:, :6], y2[:, :6]) and not torch.allclose(y[:, 6:], y2[:, 6:])
    with torch.no_grad():
        state, outs = None, []
        for a, b in [(0, 5), (5, 6), (6, 7), (7, 14)]:
            piece = x[:, a:b]
            o, state = attn(piece, piece, piece, state=state, return_state=True)
            outs.append(o)
    assert_rel_close(torch.cat(outs, 1), y, 1e-5)
    assert state.position == 14 and state.nbytes() > 0


def test_hebbian_matches_reference():
    attn = RMHA(E, NH, "hebbian", batch_first=True)
    x = torch.randn(2, 9, E)
    out, _ = attn(x, x, x)
    with torch.no_grad():
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).double().chunk(3, -1)
        q, k, v = (t.view(2, 9, NH, E // NH).transpose(1, 2) for t in (q, k, v))
        A = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)).tril()
        o = (A @ v) / (A.sum(-1, keepdim=True) + 1e-6)
        ref = F.linear(o.transpose(1, 2).reshape(2, 9, E), attn.out_proj.weight.double(),
                       attn.out_proj.bias.double())
    assert_rel_close(out, ref, 1e-5)


def test_errors():
    attn = RMHA(E, NH, "bsbr", batch_first=True)
    x, other = torch.randn(1, 5, E), torch.randn(1, 5, E)
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, other, other)
    with pytest.raises(ValueError, match="need_weights"):
        attn(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="bidirectional"):
        attn(x, x, x, is_causal=False)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, x, x, attn_mask=torch.zeros(5, 5))                 # all visible
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.tensor([[False, False, True, True, True]]))
    attn(x, x, x, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))   # no padding: fine
    with pytest.raises(TypeError, match="autocast"):
        xb = x.bfloat16()
        attn(xb, xb, xb)
    with pytest.raises(ValueError, match="dropout"):
        RMHA(E, NH, dropout=0.1)
    with pytest.raises(ValueError, match="kind"):
        RMHA(E, NH, "softmax")
    with pytest.raises(ValueError, match="embed_dim"):
        RMHA(21, NH)


@pytest.mark.parametrize("kind", ["bsbr", "hebbian"])
def test_autocast_bf16(kind):
    attn = RMHA(E, NH, kind, chunk_size=4, batch_first=True)
    x = torch.randn(2, 10, E)
    ref, _ = attn(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attn(x, x, x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.float(), ref, 3e-2)
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


def test_states_are_the_shared_state_types():
    """kind "bsbr" streams a BSBRState (the one BSBR state, no meta-key buffer: hk = k), kind
    "hebbian" a RecurrentState holding S' [B,H,d,d+1]; the wrong one is refused by name."""
    from baselines import RecurrentState
    from bsbr import BSBRState
    x = torch.randn(2, 6, E)
    b, h = RMHA(E, NH, "bsbr", chunk_size=4, batch_first=True), RMHA(E, NH, "hebbian",
                                                                    batch_first=True)
    _, sb = b(x, x, x, return_state=True)
    _, sh = h(x, x, x, return_state=True)
    assert isinstance(sb, BSBRState) and sb.hk is None and sb.bank.n == 1 and sb.fill == 2
    assert isinstance(sh, RecurrentState) and sh.S.shape == (2, NH, E // NH, E // NH + 1)
    assert sb.position == sh.position == 6
    with pytest.raises(TypeError, match="expected a RecurrentState"):
        h(x, x, x, state=sb)
    with pytest.raises(TypeError, match="expected a BSBRState"):
        b(x, x, x, state=sh)
    with pytest.raises(ValueError, match="batch size 1"):
        b(x[:1], x[:1], x[:1], state=sb)
    with pytest.raises(ValueError, match="chunk_size 8"):
        RMHA(E, NH, "bsbr", chunk_size=8, batch_first=True)(x, x, x, state=sb)
    empty = b.init_state(2)
    y0, _ = b(x, x, x, state=empty, return_state=True)
    assert torch.equal(y0, b(x, x, x)[0])


def test_constructor_arguments_are_documented_and_checked():
    assert "chunk_size" in RMHA.__init__.__doc__ and "feature_map" in RMHA.__init__.__doc__
    with pytest.raises(ValueError, match="eps"):
        RMHA(E, NH, "hebbian", eps=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        RMHA(E, NH, "hebbian", backend="tritn")
    with pytest.raises(ValueError, match="backend"):
        RMHA(E, NH, "bsbr", backend="dense")                # a Hebbian backend, not a BSBR one
    with pytest.raises(TypeError, match="chunk_size"):
        RMHA(E, NH, chunk_size=4.0)

"""BDHAttention, the drop-in module: shape contract, an independent oracle, causality,
streaming equivalence, state size, bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import bdh
from bdh import BDH, BDHAttention, BDHConfig, BDHState
from helpers import assert_rel_close


def make_attn(D=24, nh=3, N=20, chunk_size=16, rope=True):
    torch.manual_seed(0)
    attn = BDHAttention(D, nh, N, backend="torch", chunk_size=chunk_size, rope=rope)
    with torch.no_grad():
        attn.encoder.normal_(std=0.2)
        attn.out_proj.weight.normal_(std=0.2)
    return attn


def oracle(attn, x):
    """Dense float64 transcription: relu(x @ enc) → RoPE → tril(-1) scores → LN per head → W_o."""
    x = x.double()
    B, T, D = x.shape
    enc = attn.encoder.detach().double()
    nh, _, N = enc.shape
    xs = torch.relu(x.unsqueeze(1) @ enc)
    j = torch.arange(N, dtype=torch.float64) // 2
    freq = (2.0 ** 16) ** (-2 * j / N) / (2 * math.pi)
    ph = torch.remainder(torch.arange(T, dtype=torch.float64)[:, None] * freq, 1) * 2 * math.pi
    rot = torch.stack((-xs[..., 1::2], xs[..., 0::2]), -1).reshape(xs.shape)
    q = xs * torch.cos(ph) + rot * torch.sin(ph) if attn.attn.rope else xs
    a = (q @ q.mT).tril(-1) @ x.unsqueeze(1)
    a = F.layer_norm(a, (D,))
    return a.transpose(1, 2).reshape(B, T, nh * D) @ attn.out_proj.weight.detach().double().T


def test_shape_contract_and_oracle():
    attn = make_attn()
    x = torch.randn(2, 37, 24)
    y = attn(x)
    assert y.shape == (2, 37, 24) and y.dtype == torch.float32
    assert_rel_close(y, oracle(attn, x), 1e-4, "BDHAttention")
    y2, st = attn(x, state=None, return_state=True)
    assert torch.equal(y, y2)
    assert isinstance(st, BDHState) and st.position == 37 and len(st.layers) == 1
    assert st.layers[0].shape == (2, 3, 20, 24) and st.layers[0].dtype == torch.float32
    assert (y[:, 0] == 0).all(), "strict causality: the first token has no past"
    y.sum().backward()
    assert attn.encoder.grad is not None and attn.out_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rope", [True, False])
def test_causality_perturbation(rope):
    attn = make_attn(rope=rope)
    x = torch.randn(2, 40, 24)
    t = 21
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 24)
    with torch.no_grad():
        a, b = attn(x), attn(x2)
    assert (a[:, :t] - b[:, :t]).abs().max() <= 1e-6
    # Position t moves through its query; later positions through k_t and v_t too.
    assert ((a[:, t:] - b[:, t:]).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("grad", [False, True])
def test_streaming_equals_one_call(grad):
    attn = make_attn()
    x = torch.randn(2, 50, 24)
    with torch.no_grad():
        full = attn(x)
    cuts = [0, 1, 2, 9, 10, 27, 28, 29, 50]
    state, ys, sizes = None, [], []
    with torch.set_grad_enabled(grad):
        for a, b in zip(cuts, cuts[1:]):
            y, state = attn(x[:, a:b], state=state, return_state=True)
            ys.append(y.detach())
            sizes.append(state.nbytes())
    assert_rel_close(torch.cat(ys, dim=1), full, 1e-5, "streamed output")
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 3 * 20 * 24 * 4


def test_without_rope_q_and_k_are_the_features_themselves():
    """rope=False (an ablation for recall experiments): the oracle without the rotation, in one
    call, streamed in pieces and token by token; its state refuses a module with RoPE."""
    attn = make_attn(rope=False)
    x = torch.randn(2, 30, 24)
    y = attn(x)
    assert_rel_close(y, oracle(attn, x), 1e-4, "BDHAttention(rope=False)")
    assert (y - make_attn()(x)).abs().max() > 1e-3          # the rotation did matter
    state, ys = None, []
    with torch.no_grad():
        for a, b in zip([0, 7, 8, 9, 10], [7, 8, 9, 10, 30]):
            out, state = attn(x[:, a:b], state=state, return_state=True)
            ys.append(out)
    assert_rel_close(torch.cat(ys, 1), y.detach(), 1e-5, "streamed without RoPE")
    with pytest.raises(ValueError, match="different configuration"):
        make_attn()(x[:, :3], state=state)
    with pytest.raises(ValueError, match="rope: expected True or False"):
        BDHAttention(24, 3, 20, rope="no")


def test_rope_module_is_shared_with_bdh():
    model = BDH(BDHConfig(n_layer=1, n_embd=16, n_head=2, mlp_internal_dim_multiplier=4))
    attn = BDHAttention(16, 2, 32)
    assert type(model.attn) is type(attn.attn) is bdh.attention.HebbianRoPE
    assert torch.equal(model.attn.freqs, attn.attn.freqs)


def test_bad_inputs_raise_clearly():
    attn = make_attn()
    with pytest.raises(ValueError, match="T >= 1"):
        attn(torch.randn(1, 0, 24))
    with pytest.raises(ValueError, match=r"\[B,T,D\] with D = 24"):
        attn(torch.randn(1, 5, 23))
    with pytest.raises(TypeError, match="floating"):
        attn(torch.ones(1, 5, 24, dtype=torch.long))
    other = BDHAttention(24, 3, 22)
    _, st = other(torch.randn(1, 4, 24), return_state=True)
    with pytest.raises(ValueError, match="different configuration.*N: state has 22"):
        attn(torch.randn(1, 4, 24), state=st)
    with pytest.raises(ValueError, match="n_neurons"):
        BDHAttention(24, 3, 21)

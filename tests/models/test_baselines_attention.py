"""Baseline attention modules (softmax, linear, sliding window, DeltaNet) against float64
references written out plainly here: a full masked softmax, an explicit linear-attention
recurrence, a full banded mask, an explicit delta-rule loop."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from baselines import (DeltaNetAttention, KVCacheState, LinearAttention, RecurrentState,
                       SlidingWindowAttention, SoftmaxAttention)

D, H, T, B = 24, 3, 37, 2          # head_dim 8; T not a multiple of any chunk / block / window
WINDOW = 7


def make(kind, **kw):
    if kind == "softmax":
        return SoftmaxAttention(D, H, **kw)
    if kind == "linear":
        return LinearAttention(D, H, chunk_size=16, **kw)
    if kind == "sliding":
        return SlidingWindowAttention(D, H, window=WINDOW, block_size=8, **kw)
    return DeltaNetAttention(D, H, chunk_size=16, **kw)


KINDS = ["softmax", "linear", "sliding", "deltanet"]


# ---------------------------------------------------------------- float64 references
def ref_rope(x, theta=10000.0):
    """Half-split RoPE as complex rotation: (x_i + i·x_{i+d/2}) · exp(i·t·θ^{-2i/d})."""
    d = x.shape[-1]
    t = torch.arange(x.shape[-2], dtype=torch.float64)
    ang = t[:, None] * theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], dim=-1)


def ref_forward(m, x):
    """The module's function in float64, from its weights, by the plain definition."""
    x = x.double()
    W = {n: getattr(m, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    heads = lambda t: t.view(x.shape[0], x.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
    q, k, v = heads(x @ W["q_proj"].T), heads(x @ W["k_proj"].T), heads(x @ W["v_proj"].T)
    n = x.shape[1]
    s_idx, t_idx = torch.arange(n)[None, :], torch.arange(n)[:, None]
    if isinstance(m, (SoftmaxAttention, SlidingWindowAttention)):
        q, k = ref_rope(q), ref_rope(k)
        visible = s_idx <= t_idx
        if isinstance(m, SlidingWindowAttention):
            visible = visible & (t_idx - s_idx < m.window)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        o = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
    elif isinstance(m, LinearAttention):
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        S = torch.zeros(x.shape[0], H, D // H, D // H, dtype=torch.float64)
        z = torch.zeros(x.shape[0], H, D // H, dtype=torch.float64)
        outs = []
        for t in range(n):
            S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
            z = z + fk[:, :, t]
            num = torch.einsum("bhk,bhkv->bhv", fq[:, :, t], S)
            den = (fq[:, :, t] * z).sum(-1, keepdim=True)
            outs.append(num / (den + m.eps))
        o = torch.stack(outs, 2)
    else:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(x @ m.beta_proj.weight.double().T
                             + m.beta_proj.bias.double()).transpose(1, 2)
        S = torch.zeros(x.shape[0], H, D // H, D // H, dtype=torch.float64)
        outs = []
        for t in range(n):
            kt = k[:, :, t]
            err = v[:, :, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
            S = S + beta[:, :, t, None, None] * kt[..., :, None] * err[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
        o = torch.stack(outs, 2)
    return o.transpose(1, 2).reshape(x.shape[0], n, D) @ W["o_proj"].T


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_float64_reference(kind):
    m = make(kind)
    x = torch.randn(B, T, D)
    assert_rel_close(m(x), ref_forward(m, x), 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_reference(kind):
    m = make(kind).double()
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(B, T, D, dtype=torch.float64)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad((m(x) * g).sum(), [x] + params)
    ref_grads = torch.autograd.grad((ref_forward(m, x_ref) * g).sum(), [x_ref] + params,
                                    allow_unused=True)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert b is not None, name
        assert_rel_close(a, b, 1e-9, f"d{name}")


@pytest.mark.parametrize("kind", KINDS)
def test_causality_perturbation(kind):
    m = make(kind)
    x = torch.randn(B, T, D)
    t = 19
    x2 = x.clone()
    x2[:, t] += torch.randn(B, D)
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :t], y2[:, :t])
    assert not torch.allclose(y[:, t:], y2[:, t:])


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_pieces_equal_one_call(kind):
    m = make(kind)
    x = torch.randn(B, T, D)
    full = m(x)
    state, pieces = None, []
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 27), (27, T)]:
        y, state = m(x[:, a:b], state=state, return_state=True)
        pieces.append(y)
    assert_rel_close(torch.cat(pieces, 1), full, 1e-5)
    assert state.position == T


@pytest.mark.parametrize("kind", KINDS)
def test_token_by_token_decode_equals_one_call(kind):
    m = make(kind)
    x = torch.randn(B, 20, D)
    with torch.no_grad():                       # T = 1 without autograd: the decoding path
        full = m(x)
        y0, state = m(x[:, :5], return_state=True)
        keep = state
        outs = [y0]
        for t in range(5, 20):
            y, state = m(x[:, t:t + 1], state=state, return_state=True)
            outs.append(y)
        # The state handed in is never modified: re-running from it gives the same token.
        again, _ = m(x[:, 5:6], state=keep, return_state=True)
    assert_rel_close(torch.cat(outs, 1), full, 1e-5)
    assert torch.equal(again, outs[1])


def test_state_sizes():
    x = torch.randn(1, 30, D)
    hd = D // H
    sizes = {}
    for kind in KINDS:
        m = make(kind)
        _, s10 = m(x[:, :10], return_state=True)
        _, s30 = m(x, return_state=True)
        sizes[kind] = (s10.nbytes(), s30.nbytes())
    assert sizes["softmax"] == (2 * H * 10 * hd * 4, 2 * H * 30 * hd * 4)      # grows with T
    assert sizes["sliding"] == (2 * H * 6 * hd * 4,) * 2                        # w − 1 tokens
    assert sizes["linear"] == (H * hd * (hd + 1) * 4,) * 2                      # [d, d+1] fp32
    assert sizes["deltanet"] == (H * hd * hd * 4,) * 2


def test_sliding_window_edge_cases():
    x = torch.randn(B, 23, D)
    for window, block in [(1, 4), (2, 5), (50, 8), (23, 64)]:
        m = SlidingWindowAttention(D, H, window=window, block_size=block)
        assert_rel_close(m(x), ref_forward(m, x), 1e-5, f"window {window}")
        state, outs = None, []
        for a, b in [(0, 3), (3, 4), (4, 23)]:
            y, state = m(x[:, a:b], state=state, return_state=True)
            outs.append(y)
            assert state.k.shape[2] == min(window - 1, b)
        assert_rel_close(torch.cat(outs, 1), m(x), 1e-5, f"stream window {window}")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sliding_flex_forward_matches_blocks():
    blocks = SlidingWindowAttention(D, H, window=WINDOW, block_size=8)
    flex = SlidingWindowAttention(D, H, window=WINDOW, backend="flex")
    flex.load_state_dict(blocks.state_dict())
    x = torch.randn(1, 21, D)
    with torch.no_grad():           # flex_attention has no backward on the CPU
        _, state = blocks(x[:, :9], return_state=True)
        y_flex = flex(x[:, 9:], state=state)
        y_blocks = blocks(x[:, 9:], state=state)
    assert_rel_close(y_flex, y_blocks, 1e-5)


def test_softmax_without_rope_is_plain_causal_attention():
    m = SoftmaxAttention(D, H, rope=False)
    x = torch.randn(B, 11, D)
    q, k, v = (t.double() for t in m.qkv(x))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = o.transpose(1, 2).reshape(B, 11, D) @ m.o_proj.weight.double().T
    assert_rel_close(m(x), ref, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_raise(kind):
    m = make(kind)
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 5, D + 1))
    with pytest.raises(TypeError, match="x: expected a floating"):
        m(torch.ones(2, 5, D, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        m(torch.randn(2, 0, D))
    with pytest.raises(TypeError, match="state"):
        m(torch.randn(2, 5, D), state=torch.zeros(3))
    _, state = m(torch.randn(2, 5, D), return_state=True)
    with pytest.raises(ValueError, match="state"):
        m(torch.randn(3, 5, D), state=state)                    # batch mismatch
    wrong = (RecurrentState(torch.zeros(2, H, 8, 8)) if kind in ("softmax", "sliding")
             else KVCacheState(torch.zeros(2, H, 1, 8), torch.zeros(2, H, 1, 8)))
    with pytest.raises(TypeError, match="state"):
        m(torch.randn(2, 5, D), state=wrong)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="n_head"):
        SoftmaxAttention(24, 5)
    with pytest.raises(ValueError, match="d_model"):
        LinearAttention(0, 1)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowAttention(24, 3, window=0)
    with pytest.raises(ValueError, match="backend"):
        SlidingWindowAttention(24, 3, backend="tiles")
    with pytest.raises(ValueError, match="backend"):
        DeltaNetAttention(24, 3, backend="triton")
    with pytest.raises(ValueError, match="rope"):
        SoftmaxAttention(9, 3)                                  # head_dim 3 is odd
    with pytest.raises(ValueError, match="state"):
        m = SlidingWindowAttention(24, 3, window=3)
        m(torch.randn(1, 2, 24), state=KVCacheState(torch.zeros(1, 3, 5, 8),
                                                    torch.zeros(1, 3, 5, 8), 5))


def test_linear_attention_through_triton_kernels(kernel_device):
    """The Hebbian Triton kernels (interpreter on the CPU) with the ones-column: V = d + 1 = 9."""
    m = LinearAttention(D, H, chunk_size=16, backend="triton").to(kernel_device)
    x = torch.randn(B, 21, D, device=kernel_device)
    assert_rel_close(m(x), ref_forward(m.cpu(), x.cpu()), 1e-4)
    m.to(kernel_device)
    with torch.no_grad():
        y0, state = m(x[:, :17], return_state=True)
        outs = [y0]
        for t in range(17, 21):
            y, state = m(x[:, t:t + 1], state=state, return_state=True)      # hebbian_step
            outs.append(y)
    assert_rel_close(torch.cat(outs, 1), m(x), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_cuda_default_backends_match_reference(kind, dtype, tol):
    m = make(kind)
    x = torch.randn(B, 300, D)
    ref = ref_forward(m, x)
    mc = m.to("cuda", dtype)
    xc = x.to("cuda", dtype)
    assert_rel_close(mc(xc), ref, tol)
    with torch.no_grad():
        y0, state = mc(xc[:, :290], return_state=True)
        outs = [y0]
        for t in range(290, 300):
            y, state = mc(xc[:, t:t + 1], state=state, return_state=True)
            outs.append(y)
    assert_rel_close(torch.cat(outs, 1), ref, tol)


def test_linear_attention_options_are_documented_and_checked():
    assert all(n in LinearAttention.__init__.__doc__ for n in ("eps", "backend", "chunk_size"))
    for kw, error in ((dict(eps=float("nan")), ValueError), (dict(eps=0), ValueError),
                      (dict(eps="x"), TypeError), (dict(chunk_size=17), ValueError),
                      (dict(backend="tritn"), ValueError)):
        with pytest.raises(error, match=next(iter(kw))):
            LinearAttention(D, H, **kw)


def test_hebbian_is_not_a_mixer_name():
    """"hebbian" means normalised linear attention in transformers; the mixer of BDH's attention
    is "bdh", and the error says which name means what."""
    from baselines import MixerLMConfig, build_mixer
    for make_it in (lambda: build_mixer("hebbian", D, H), lambda: MixerLMConfig(mixer="hebbian")):
        with pytest.raises(ValueError, match="'bdh' for BDH's attention.*'linear' for normalised"):
            make_it()
    assert type(build_mixer("bdh", D, H, n_neurons=16)).__name__ == "BDHAttention"

"""kernels.normalised_hebbian_attention: normalised linear attention on the Hebbian kernels,
against a float64 quadratic reference; streaming; the state left alone or updated in place;
clear errors for bad options."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from kernels import check_normalised_options, normalised_hebbian_attention

B, H, T, K, V = 2, 3, 37, 7, 5           # T not a multiple of the chunk; K != V


def reference(q, k, v, feature_map="elu", eps=1e-6):
    """o_t = Σ_{s≤t} (φq_t·φk_s) v_s / (Σ_{s≤t} φq_t·φk_s + eps), float64, quadratic form."""
    phi = (lambda x: F.elu(x) + 1) if feature_map == "elu" else F.relu
    q, k, v = (t.double() for t in (q, k, v))
    A = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    return (A @ v) / (A.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_reference_in_pieces_and_token_by_token(feature_map, backend, kernel_device):
    q, k, v = (torch.randn(B, H, T, d, device=kernel_device) for d in (K, K, V))
    ref = reference(q, k, v, feature_map)
    kw = dict(feature_map=feature_map, chunk_size=16, backend=backend)
    o, S = normalised_hebbian_attention(q, k, v, **kw)
    assert S is None and o.dtype == v.dtype
    assert_rel_close(o, ref, 1e-5)
    _, S = normalised_hebbian_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30],
                                        output_final_state=True, **kw)
    assert S.shape == (B, H, K, V + 1) and S.dtype == torch.float32
    outs = []
    with torch.no_grad():
        for t in range(30, T):                               # the step kernel
            o1, S = normalised_hebbian_attention(q[:, :, t:t + 1], k[:, :, t:t + 1],
                                                 v[:, :, t:t + 1], S, output_final_state=True,
                                                 **kw)
            outs.append(o1)
    assert_rel_close(torch.cat(outs, 2), ref[:, :, 30:], 1e-5)


@pytest.mark.parametrize("T_new", [1, 6])                   # the step and the chunked path
def test_state_left_alone_or_updated_in_place(T_new):
    q, k, v = (torch.randn(B, H, T_new, d) for d in (K, K, V))
    S0 = torch.rand(B, H, K, V + 1)
    before = S0.clone()
    with torch.no_grad():
        o, S = normalised_hebbian_attention(q, k, v, S0, output_final_state=True)
        assert torch.equal(S0, before) and S.data_ptr() != S0.data_ptr()
        o2, S2 = normalised_hebbian_attention(q, k, v, S0, inplace=True)
    assert S2 is S0 and torch.equal(S0, S) and torch.equal(o2, o)
    assert not torch.equal(S0, before)


def test_gradients_match_reference():
    q, k, v = (torch.randn(B, H, 21, d, requires_grad=True) for d in (K, K, V))
    o, _ = normalised_hebbian_attention(q, k, v, chunk_size=16)
    ref = reference(q, k, v)
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum(), (q, k, v))
    want = torch.autograd.grad((ref * do.double()).sum(), (q, k, v))
    for name, g, r in zip("qkv", got, want):
        assert_rel_close(g, r, 1e-4, name=f"d{name}")


@pytest.mark.parametrize("option,value,error", [
    ("feature_map", "softmax", ValueError), ("eps", math.nan, ValueError),
    ("eps", -1e9, ValueError), ("eps", 0.0, ValueError), ("eps", math.inf, ValueError),
    ("eps", "x", TypeError), ("eps", True, TypeError), ("chunk_size", 17, ValueError),
    ("chunk_size", 256, ValueError), ("backend", "tritn", ValueError)])
def test_bad_options_raise_naming_the_option(option, value, error):
    with pytest.raises(error, match=f"cfg.{option}: expected"):
        check_normalised_options(**{option: value}, prefix="cfg.")
    x = torch.randn(1, 1, 3, 4)
    with pytest.raises(error, match=option):
        normalised_hebbian_attention(x, x, x, **{option: value})

"""The causal short convolution in front of the mixers (baselines.short_conv)."""
import pytest
import torch

from baselines import MixerLMConfig, ShortConv
from helpers import assert_rel_close


def reference(x, weight, bias):
    """y_t = b + Σ_i w[:, 0, k-1-i] x_{t-i}, float64 loops."""
    B, T, D = x.shape
    k = weight.shape[-1]
    y = bias.double().expand(B, T, D).clone()
    for t in range(T):
        for i in range(k):
            if t - i >= 0:
                y[:, t] += weight[:, 0, k - 1 - i].double() * x[:, t - i].double()
    return y


@pytest.mark.parametrize("k", [1, 2, 4])
def test_short_conv_equals_the_reference_and_streams(k):
    conv = ShortConv(6, k)
    x = torch.randn(2, 11, 6)
    assert_rel_close(conv(x), reference(x, conv.weight, conv.bias), 1e-6)
    state, pieces = None, []
    for a, b in [(0, 1), (1, 2), (2, 7), (7, 11)]:
        y, state = conv(x[:, a:b], state, return_state=True)
        pieces.append(y)
    assert_rel_close(torch.cat(pieces, 1), conv(x), 1e-6)
    assert list(state.shape) == [2, k - 1, 6]
    assert torch.equal(state, x[:, 11 - (k - 1):])


def test_short_conv_is_causal_and_sees_its_window():
    conv = ShortConv(4, 3)
    x = torch.randn(1, 10, 4)
    x2 = x.clone()
    x2[0, 5] += 1.0
    d = (conv(x2) - conv(x)).abs().amax(-1)[0]
    assert (d[:5] == 0).all() and (d[5:8] > 0).all() and (d[8:] == 0).all()


def test_short_conv_bad_inputs():
    conv = ShortConv(4, 3)
    with pytest.raises(ValueError, match="D = 4"):
        conv(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="state"):
        conv(torch.randn(1, 5, 4), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="kernel_size"):
        ShortConv(4, 0)
    with pytest.raises(ValueError, match="short_conv"):
        MixerLMConfig(short_conv=-1)

"""The dense (masked quadratic, cuBLAS) backend against the float64 recurrence."""
import pytest
import torch

from helpers import assert_rel_close
from kernels import hebbian_attention, hebbian_recurrent


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
@pytest.mark.parametrize("decay_on", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("shared_v", [False, True], ids=["v_per_head", "v_shared"])
def test_dense_forward_and_grads(strict, decay_on, shared_v):
    B, H, T, K, V = 2, 3, 37, 20, 12
    q = torch.randn(B, H, T, K, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, T, K, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 1 if shared_v else H, T, V, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, K, V, dtype=torch.float32, requires_grad=True)
    decay = torch.tensor([0.9, 0.99, 1.0], dtype=torch.float64) if decay_on else None
    do = torch.randn(B, H, T, V, dtype=torch.float64)
    dS = torch.randn(B, H, K, V, dtype=torch.float64)

    def run(fn, qq, kk, vv, hh):
        o, S = fn(qq, kk, vv, hh)
        (o * do).sum().backward(retain_graph=True)
        (S.double() * dS).sum().backward()
        return o, S

    grads = {}
    outs = {}
    for name in ("dense", "ref"):
        xs = [t.detach().clone().requires_grad_() for t in (q, k, v, h0)]
        if name == "dense":
            fn = lambda a, b, c, d: hebbian_attention(  # noqa: E731
                a.float(), b.float(), c.float(), scale=0.7, strict=strict,
                decay=None if decay is None else decay.float(), initial_state=d,
                output_final_state=True, backend="dense")
        else:
            fn = lambda a, b, c, d: hebbian_recurrent(  # noqa: E731
                a, b, c, scale=0.7, strict=strict, decay=decay, initial_state=d.double())
        outs[name] = run(fn, *xs)
        grads[name] = [t.grad for t in xs]
    assert_rel_close(outs["dense"][0], outs["ref"][0], 1e-5, "o")
    assert_rel_close(outs["dense"][1], outs["ref"][1], 1e-5, "S")
    for n, g, r in zip("qkvh", grads["dense"], grads["ref"]):
        assert_rel_close(g, r, 1e-5, f"d{n}")


def test_dense_half_precision_and_no_state():
    B, H, T, K, V = 1, 2, 50, 64, 16
    q, k = torch.randn(2, B, H, T, K).unbind(0)
    v = torch.randn(B, 1, T, V)
    o, S = hebbian_attention(q.half(), k.half(), v.half(), backend="dense")
    o_ref, _ = hebbian_recurrent(q.double(), k.double(), v.double())
    assert S is None and o.dtype == torch.float16
    assert_rel_close(o, o_ref, 1e-2, "o fp16")

"""kernels.bsbr at the edges of its inputs: a NaN or inf in a routing input gives NaN in exactly
the reference's output rows on every backend (and the other rows keep their values), and the
blockwise PyTorch path's memory follows T, not chunk_size."""
import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_rel_close
from kernels.bsbr import (bsbr_attention, bsbr_attention_ref, chunk_local_attention,
                          chunk_local_attention_ref, routed_readout_step,
                          routed_readout_step_ref)

B, H, T, K, V, M, C = 1, 2, 37, 8, 8, 4, 8
NAN, INF = float("nan"), float("inf")
# (input, position, value, the reference's NaN rows of head 1 by the contract)
CASES = {"nan_hk": ("hk", 10, NAN, set(range(16, T))),      # chunk 1: every later chunk
         "nan_r": ("r", 20, NAN, {20}),
         "inf_r": ("r", 30, INF, {30}),                      # meets a positive h: row 30
         "minus_inf_r": ("r", 30, -INF, set()),              # every score -inf: no candidate
         "nan_q": ("q", 12, NAN, {12})}


def nan_rows(o):
    """{(head, t)} of the rows holding a NaN."""
    return {tuple(i) for i in torch.isnan(o[0]).any(-1).nonzero().tolist()}


def inputs(dev, case):
    name, t, value, _ = CASES[case]
    x = dict(q=torch.randn(B, H, T, K), k=torch.randn(B, H, T, K), v=torch.randn(B, H, T, V),
             r=torch.randn(B, H, T, M), hk=torch.randn(B, H, T, M))
    x["hk"][..., 2] = x["hk"][..., 2].abs() + 0.1          # h_j[2] > 0: r = ±inf there gives ±inf
    x[name][0, 1, t, 2] = value
    return {n: a.to(dev) for n, a in x.items()}


# The interpreter's numpy matmul warns about inf · 0 products; their NaN is the point.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("top_k", [2, None], ids=["top2", "dense"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_routing_input_reaches_the_reference_rows(kernel_device, backend, top_k, case):
    x = inputs(kernel_device, case)
    kw = dict(chunk_size=C, top_k=top_k)
    ref = bsbr_attention_ref(**{n: a.double() for n, a in x.items()}, **kw)
    assert nan_rows(ref) == {(1, t) for t in CASES[case][3]}     # the contract, read literally
    o = bsbr_attention(**x, **kw, backend=backend)
    assert nan_rows(o) == nan_rows(ref)
    clean = ~torch.isnan(ref).any(-1, keepdim=True)
    assert_rel_close(torch.where(clean, o.double(), 0), torch.where(clean, ref, 0), 2e-5)


@pytest.mark.parametrize("name", ["r", "bank_h"])
def test_nonfinite_step_input_reaches_the_reference_rows(name):
    x = dict(q=torch.randn(B, H, K), r=torch.randn(B, H, M), bank_F=torch.randn(B, H, 5, K, V),
             bank_h=torch.randn(B, H, 5, M))
    x[name][0, 1, ..., 1] = NAN if name == "r" else x[name][0, 1, ..., 1]
    if name == "bank_h":
        x[name][0, 1, 3, 1] = NAN
    long, _ = routed_readout_step(**x, top_k=2)
    ref, _ = routed_readout_step_ref(**{n: a.double() for n, a in x.items()}, top_k=2)
    assert nan_rows(ref[:, :, None]) == {(1, 0)}
    assert nan_rows(long[:, :, None]) == nan_rows(ref[:, :, None])


class LargestTensor(TorchDispatchMode):
    """Raises as soon as an op creates a tensor of more than ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.limit:
                raise AssertionError(f"{func} made a tensor of {t.numel()} elements "
                                     f"(shape {list(t.shape)}); the limit is {self.limit}")
        return out


@pytest.mark.parametrize("offset", [0, 5])
def test_memory_follows_T_not_chunk_size(offset):
    """chunk_size = 65536 >= T = 40 (exact softmax attention): the torch path allocates nothing
    larger than a few T×T score blocks, forward and backward, and matches the reference."""
    Tq, Tk, big = 40 - offset, 40, 65536
    x = dict(q=torch.randn(B, H, Tq, K), k=torch.randn(B, H, Tk, K), v=torch.randn(B, H, Tk, V),
             r=torch.randn(B, H, Tq, M), hk=torch.randn(B, H, Tk, M))
    leaves = {n: a.clone().requires_grad_() for n, a in x.items()}
    do = torch.randn(B, H, Tq, V)
    with LargestTensor(limit=4 * B * H * Tk * Tk):
        local = chunk_local_attention(leaves["q"], leaves["k"], leaves["v"], chunk_size=big,
                                      offset=offset, backend="torch")
        o = bsbr_attention(**leaves, chunk_size=big, top_k=2, offset=offset, backend="torch")
        (o * do).sum().backward()
    x64 = {n: a.double().requires_grad_() for n, a in x.items()}
    o_r = bsbr_attention_ref(**x64, chunk_size=big, top_k=2, offset=offset)
    (o_r * do.double()).sum().backward()
    assert_rel_close(local, chunk_local_attention_ref(x64["q"], x64["k"], x64["v"],
                                                      chunk_size=big, offset=offset), 1e-5)
    assert_rel_close(o, o_r, 1e-5, "o")
    for n in ("q", "k", "v"):          # one chunk: r and hk route nothing (no gradient)
        assert_rel_close(leaves[n].grad, x64[n].grad, 1e-5, "d" + n)
    assert leaves["r"].grad is None and not x64["r"].grad.any()

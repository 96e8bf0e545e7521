"""hebbian_attention's layout="bthk": inputs [B,T,H,·] give the transposed result of the same
tensors in [B,H,T,·], forward and backward, on every backend, dense batches and varlen rows;
checked against the float64 reference too, so a layout read wrongly in both calls still fails.
"""
import pytest
import torch

from helpers import assert_rel_close
from kernels import ChunkLaunch, hebbian_attention, hebbian_recurrent

SPLIT = ChunkLaunch(mode="split", BT=16, BT_bwd=16, h_BK=16, h_BV=16, o_BV=16)
FUSED = ChunkLaunch(mode="fused", BT=16, BT_bwd=16, fused_BK=16, fused_BV=16)
BACKENDS = [("triton", SPLIT), ("triton", FUSED), ("torch", None), ("dense", None),
            ("reference", None)]
IDS = ["triton_split", "triton_fused", "torch", "dense", "reference"]


def run(q, k, v, h0, g, do, dS, **kw):
    """o in [B,T,H,V] order, S, and the gradients of (o·do) + (S·dS) w.r.t. q, k, v ([B,T,H,·]
    order) and h0. ``kw["layout"]`` says how q, k, v are handed over: "bthk" as they are,
    "bhtk" as transposed views."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, h0)]
    ins = leaves[:3] if kw["layout"] == "bthk" else [x.transpose(1, 2) for x in leaves[:3]]
    o, S = hebbian_attention(*ins, decay=g, initial_state=leaves[3], output_final_state=True,
                             scale=0.3, **kw)
    o = o if kw["layout"] == "bthk" else o.transpose(1, 2)
    ((o.double() * do).sum() + (S.double() * dS).sum()).backward()
    return [o, S] + [x.grad for x in leaves]


@pytest.mark.parametrize("backend,launch", BACKENDS, ids=IDS)
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("shared_v", [False, True], ids=["v_per_head", "v_shared"])
def test_bthk_is_the_transposed_bhtk(kernel_device, poison_empty, backend, launch, varlen,
                                     shared_v):
    """B = 2 (or one packed row of lengths 10 and 27), T = 37, H = 3, K = 20, V = 12, decay on."""
    dev = kernel_device
    B, T, H, K, V = (1 if varlen else 2), 37, 3, 20, 12
    N = 2 if varlen else B
    cu = torch.tensor([0, 10, 37], device=dev) if varlen else None
    q, k = torch.randn(B, T, H, K, device=dev), torch.randn(B, T, H, K, device=dev)
    v = torch.randn(B, T, 1 if shared_v else H, V, device=dev)
    h0, g = torch.randn(N, H, K, V, device=dev), torch.rand(H, device=dev) * 0.2 + 0.8
    do = torch.randn(B, T, H, V, dtype=torch.float64, device=dev)
    dS = torch.randn(N, H, K, V, dtype=torch.float64, device=dev)
    kw = dict(backend=backend, launch=launch, cu_seqlens=cu)
    bthk = run(q, k, v, h0, g, do, dS, layout="bthk", **kw)
    assert bthk[0].shape == (B, T, H, V) and bthk[0].is_contiguous() == (backend == "triton")
    bhtk = run(q, k, v, h0, g, do, dS, layout="bhtk", **kw)
    names = ("o", "S_final", "dq", "dk", "dv", "d_initial_state")
    for name, a, b in zip(names, bthk, bhtk):
        assert a.shape == b.shape, name
        assert_rel_close(a, b, 1e-6, name + " (bthk vs bhtk)")
    # The reference, sequence by sequence, on [B,H,T,·] float64 copies.
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    bounds = [(0, 10), (10, 37)] if varlen else [(0, T)]
    outs, states = [], []
    for n, (lo, hi) in enumerate(bounds):
        rows = slice(n, n + 1) if varlen else slice(None)
        o_n, S_n = hebbian_recurrent(qd[:, :, lo:hi], kd[:, :, lo:hi], vd[:, :, lo:hi],
                                     scale=0.3, decay=g.double(), initial_state=h0[rows].double())
        outs.append(o_n)
        states.append(S_n)
    assert_rel_close(bthk[0], torch.cat(outs, 2).transpose(1, 2), 1e-5, "o vs reference")
    assert_rel_close(bthk[1], torch.cat(states, 0), 1e-5, "S_final vs reference")


def test_layout_refusals_name_the_argument():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="layout: expected one of .*'BTHK'"):
        hebbian_attention(q, q, q, layout="BTHK")
    with pytest.raises(ValueError, match=r"v: expected shape \[B,T,H,V\] = \[1, 5, 2, V\] or "
                                         r"\[B,T,1,V\] = \[1, 5, 1, V\], got \[1, 2, 5, 4\]"):
        hebbian_attention(q, q, torch.randn(1, 2, 5, 4), layout="bthk")
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[B,H,K,V\] = "
                                         r"\[1, 2, 8, 4\]"):
        hebbian_attention(q, q, torch.randn(1, 5, 2, 4), layout="bthk",
                          initial_state=torch.zeros(1, 5, 8, 4))

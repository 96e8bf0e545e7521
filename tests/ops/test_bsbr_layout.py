"""layout='bthk' in kernels.bsbr: token-major inputs [B,T,H,·] give the head-major call's
results in their own layout (outputs and every gradient), on every backend, with and without
packed sequences; the Triton kernels read and write that memory without copying it; bad layouts
and shapes are refused naming the layout."""
import itertools

import pytest
import torch

import kernels.bsbr.layout as layout_mod
from helpers import assert_rel_close
from kernels.bsbr import (BSBRLaunch, ReadoutLaunch, bsbr_attention, chunk_local_attention,
                          chunk_states)

f64, fp32, fp16 = torch.float64, torch.float32, torch.float16
B, H, K, V, M, C = 2, 3, 12, 20, 5, 8
NAMES = ("q", "k", "v", "r", "hk")


def token_major(Tq, offset, dtype, device, B=B):
    """q, k, v, r, hk [B, T, H, ·] (contiguous token-major), k/v/hk with offset more rows."""
    Tk = Tq + offset
    return [torch.randn(B, T, H, d, device=device).to(dtype)
            for T, d in ((Tq, K), (Tk, K), (Tk, V), (Tq, M), (Tk, M))]


def run(fn, leaves, do):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    o = fn(*leaves)
    return o, torch.autograd.grad((o.double() * do).sum(), leaves)


def same(a, b, backend, name):
    """The Triton kernels run the same products in either layout: bit-equal; PyTorch may pick
    other matmul paths for strided views."""
    if backend == "triton":
        assert torch.equal(a, b), name
    else:
        assert_rel_close(a, b, 1e-12 if a.dtype == f64 else 1e-6, name)


@pytest.mark.parametrize("backend,dtype", [("reference", f64), ("torch", fp32),
                                           ("triton", fp32), ("triton", fp16)])
@pytest.mark.parametrize("offset,n,top_k", [(0, 0, 2), (5, 2, None)])
def test_bsbr_attention_bthk(poison_empty, kernel_device, backend, dtype, offset, n, top_k):
    Tq = 29 - offset
    x = token_major(Tq, offset, dtype, kernel_device)
    bank = {}
    if n:
        sd = f64 if dtype == f64 else fp32
        bank = dict(bank_F=torch.randn(B, H, n, K, V, dtype=sd, device=kernel_device),
                    bank_h=torch.randn(B, H, n, M, device=kernel_device).to(dtype))
    kw = dict(chunk_size=C, top_k=top_k, offset=offset, backend=backend, **bank)
    do = torch.randn(B, Tq, H, V, dtype=f64, device=kernel_device)
    o, g = run(lambda *a: bsbr_attention(*a, layout="bthk", **kw), x, do)
    o_h, g_h = run(lambda *a: bsbr_attention(*(t.transpose(1, 2) for t in a), **kw)
                   .transpose(1, 2), x, do)
    assert o.shape == (B, Tq, H, V) and o.is_contiguous() and o.dtype == dtype
    same(o, o_h, backend, "o")
    for name, a, b in zip(NAMES, g, g_h):
        same(a, b, backend, "d" + name)


@pytest.mark.parametrize("readout", [ReadoutLaunch(products="16bit"),
                                     ReadoutLaunch(products="16bit", backward="two_pass"),
                                     ReadoutLaunch(mode="tile")], ids=["one_pass", "two_pass",
                                                                       "tile"])
def test_readout_forms_bthk(poison_empty, kernel_device, readout):
    """The grouped readout's one-pass and two-pass backwards (16-bit products) and the tile
    form on token-major memory."""
    x = token_major(29, 0, fp16, kernel_device)
    kw = dict(chunk_size=C, top_k=2, backend="triton", launch=BSBRLaunch(readout=readout))
    do = torch.randn(B, 29, H, V, dtype=f64, device=kernel_device)
    o, g = run(lambda *a: bsbr_attention(*a, layout="bthk", **kw), x, do)
    o_h, g_h = run(lambda *a: bsbr_attention(*(t.transpose(1, 2) for t in a), **kw)
                   .transpose(1, 2), x, do)
    same(o, o_h, "triton", "o")
    for name, a, b in zip(NAMES, g, g_h):
        same(a, b, "triton", "d" + name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_local_and_states_bthk(kernel_device, backend):
    q, k, v, _, hk = token_major(21, 3, fp32, kernel_device)
    o = chunk_local_attention(q, k, v, chunk_size=C, offset=3, layout="bthk", backend=backend)
    o_h = chunk_local_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                chunk_size=C, offset=3, backend=backend)
    assert o.shape == (B, 21, H, V) and o.is_contiguous()
    same(o, o_h.transpose(1, 2), backend, "local")
    F, h = chunk_states(k, v, hk, chunk_size=C, layout="bthk", backend=backend)
    F_h, h_h = chunk_states(*(t.transpose(1, 2) for t in (k, v, hk)), chunk_size=C,
                            backend=backend)
    assert F.shape == (B, H, 3, K, V) and h.shape == (B, H, 3, M)       # states stay [B,H,n,·]
    same(F, F_h, backend, "F")
    same(h, h_h, backend, "h")


@pytest.mark.parametrize("backend,dtype", [("torch", fp32), ("triton", fp32)])
def test_packed_sequences_bthk(kernel_device, backend, dtype):
    lengths = (11, 4, 19)
    x = token_major(sum(lengths), 0, dtype, kernel_device, B=1)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64,
                      device=kernel_device)
    kw = dict(chunk_size=C, top_k=2, cu_seqlens=cu, backend=backend)
    do = torch.randn(1, sum(lengths), H, V, dtype=f64, device=kernel_device)
    o, g = run(lambda *a: bsbr_attention(*a, layout="bthk", **kw), x, do)
    o_h, g_h = run(lambda *a: bsbr_attention(*(t.transpose(1, 2) for t in a), **kw)
                   .transpose(1, 2), x, do)
    assert o.shape == (1, sum(lengths), H, V) and o.is_contiguous()
    same(o, o_h, backend, "o")
    for name, a, b in zip(NAMES, g, g_h):
        same(a, b, backend, "d" + name)


def test_triton_reads_token_major_memory_in_place(kernel_device, monkeypatch):
    """Forward and backward of a token-major call: every tensor a Triton kernel takes is the
    caller's memory (or the gradient as autograd hands it), never a transposed copy."""
    copies = []
    real = layout_mod.stored_as

    def spy(x, bthk):
        out = real(x, bthk)
        copies.append(out.data_ptr() != x.data_ptr())
        return out
    for mod in ("local_triton", "states_triton", "routing_triton", "readout_grouped"):
        monkeypatch.setattr(f"kernels.bsbr.{mod}.stored_as", spy)
    x = [t.requires_grad_() for t in token_major(29, 0, fp32, kernel_device)]
    o = bsbr_attention(*x, chunk_size=C, top_k=2, layout="bthk", backend="triton")
    o.backward(torch.randn_like(o))
    assert len(copies) >= 8 and not any(copies)
    # a head-major tensor handed to a token-major call is copied into the layout once
    y = x[0].detach().transpose(1, 2).contiguous()            # [B,H,T,K] head-major
    assert real(y, True).data_ptr() != y.data_ptr()


def test_bad_layout_and_shapes_name_the_layout():
    x = token_major(10, 0, fp32, "cpu")
    with pytest.raises(ValueError, match=r"layout: expected one of \('bhtk', 'bthk'\), got 'bhkt'"):
        bsbr_attention(*x, chunk_size=4, layout="bhkt")
    with pytest.raises(ValueError, match="layout"):
        chunk_states(*x[1:3], x[4], chunk_size=4, layout="BTHK")
    bad = [x[0], x[1][:, :9], *x[2:]]
    with pytest.raises(ValueError, match=r"k: expected .*layout 'bthk'"):
        bsbr_attention(*bad, chunk_size=4, layout="bthk")

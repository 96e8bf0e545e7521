"""The blockwise PyTorch backend of kernels.bsbr (and the routed decode step) against the
float64 reference: outputs, slot weights and the gradients of every input, with the routing
and readout blocks forced small so the blocked loops really run more than once."""
import pytest
import torch

import kernels.bsbr.readout_torch as readout_torch
import kernels.bsbr.routing as routing
from helpers import assert_rel_close
from kernels.bsbr import (bsbr_attention, bsbr_attention_ref, chunk_local_attention,
                          chunk_local_attention_ref, chunk_states, chunk_states_ref,
                          routed_readout_step, routed_readout_step_ref)

f64 = torch.float64
NAMES = ("q", "k", "v", "r", "hk", "bank_F", "bank_h")


def make(B, H, Tq, K, V, M, offset=0, n=0, dtype=torch.float32):
    Tk = offset + Tq
    x = dict(q=torch.randn(B, H, Tq, K), k=torch.randn(B, H, Tk, K), v=torch.randn(B, H, Tk, V),
             r=torch.randn(B, H, Tq, M), hk=torch.randn(B, H, Tk, M))
    x = {name: t.to(dtype) for name, t in x.items()}
    if n:
        # states are float32 by contract; the float64 oracle runs keep them float64
        x["bank_F"] = torch.randn(B, H, n, K, V, dtype=f64 if dtype == f64 else torch.float32)
        x["bank_h"] = torch.randn(B, H, n, M).to(dtype)
    return x


def run(fn, x, do, **kw):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    o, w = fn(**leaves, return_slot_weights=True, **kw)
    (o.double() * do).sum().backward()
    return o, w, {n: t.grad for n, t in leaves.items()}


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(routing, "SCORE_BLOCK_ELEMS", 64)
    monkeypatch.setattr(readout_torch, "GATHER_BLOCK_ELEMS", 4000)


@pytest.mark.parametrize("dtype,tol", [(f64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("C,top_k,offset,n", [(4, 2, 0, 0), (8, None, 5, 3), (4, 1, 3, 2),
                                              (16, 3, 0, 4), (5, 100, 2, 1)])
@pytest.mark.parametrize("form", ["gathered", "all_slots"])
def test_torch_backend_matches_reference(small_blocks, monkeypatch, form, dtype, tol, C, top_k,
                                         offset, n):
    # Both readout forms on every case (the default picks by S against k).
    monkeypatch.setattr(readout_torch, "ALL_SLOTS_FACTOR", 0 if form == "gathered" else 10**6)
    x = make(2, 2, 37 - offset, 12, 20, 5, offset=offset, n=n, dtype=dtype)
    do = torch.randn(2, 2, 37 - offset, 20, dtype=f64)
    kw = dict(chunk_size=C, top_k=top_k, offset=offset)
    o, w, g = run(bsbr_attention, x, do, backend="torch", **kw)
    x64 = {name: t.double() for name, t in x.items()}
    o_r, w_r, g_r = run(bsbr_attention_ref, x64, do, **kw)
    assert o.dtype == dtype and w.shape == (2, 2, n)
    assert_rel_close(o, o_r, tol, "o")
    if n:
        assert_rel_close(w, w_r, tol, "slot_weights")
    for name in x:
        assert_rel_close(g[name], g_r[name], tol, "d" + name)


@pytest.mark.parametrize("offset", [0, 3])
def test_local_torch_matches_reference(offset):
    x = make(2, 3, 33 - offset, 33, 12, 4, offset=offset)
    leaves = [x[n].double().requires_grad_() for n in ("q", "k", "v")]
    do = torch.randn(2, 3, 33 - offset, 12, dtype=f64)
    o = chunk_local_attention(*leaves, chunk_size=8, offset=offset, scale=0.3, backend="torch")
    grads = torch.autograd.grad((o * do).sum(), leaves)
    o_r = chunk_local_attention_ref(*leaves, chunk_size=8, offset=offset, scale=0.3)
    grads_r = torch.autograd.grad((o_r * do).sum(), leaves)
    assert_rel_close(o, o_r, 1e-12)
    for a, b in zip(grads, grads_r):
        assert_rel_close(a, b, 1e-12)


def test_chunk_states_api_matches_reference():
    x = make(2, 2, 30, 12, 20, 5)
    F, h = chunk_states(x["k"], x["v"], x["hk"], chunk_size=8)
    F_r, h_r = chunk_states_ref(x["k"].double(), x["v"].double(), x["hk"].double(), chunk_size=8)
    assert F.dtype == torch.float32 and F.shape == (2, 2, 3, 12, 20) and h.shape == (2, 2, 3, 5)
    assert_rel_close(F, F_r, 1e-6)
    assert_rel_close(h, h_r, 1e-6)


def test_no_candidates_is_local_only():
    x = make(1, 2, 6, 12, 20, 5)
    o, w = bsbr_attention(**x, chunk_size=8, top_k=2, return_slot_weights=True, backend="torch")
    assert w.shape == (1, 2, 0)
    assert_rel_close(o, chunk_local_attention_ref(x["q"], x["k"], x["v"], chunk_size=8), 1e-6)


@pytest.mark.parametrize("top_k", [1, 3, None, 50])
def test_step_matches_reference(top_k):
    q, r = torch.randn(2, 3, 12), torch.randn(2, 3, 5)
    bF, bh = torch.randn(2, 3, 7, 12, 20), torch.randn(2, 3, 7, 5)
    long, w = routed_readout_step(q, r, bF, bh, top_k=top_k)
    long_r, w_r = routed_readout_step_ref(q.double(), r.double(), bF.double(), bh.double(),
                                          top_k=top_k)
    assert long.dtype == torch.float32 and long.shape == (2, 3, 20) and w.shape == (2, 3, 7)
    assert_rel_close(long, long_r, 1e-6)
    assert_rel_close(w, w_r, 1e-6)
    if top_k is not None and top_k < 7:
        assert int((w > 0).sum(-1).max()) == top_k


def test_step_empty_bank():
    long, w = routed_readout_step(torch.randn(1, 2, 12), torch.randn(1, 2, 5),
                                  torch.randn(1, 2, 0, 12, 20), torch.randn(1, 2, 0, 5), top_k=2)
    assert long.shape == (1, 2, 20) and not long.any() and w.shape == (1, 2, 0)


@pytest.mark.parametrize("split", [5, 8, 19])
def test_torch_backend_continuation(split):
    """Feeding a sequence in two calls (bank = completed chunks of the first, the partial
    chunk's k/v/hk as prefix, offset = split % C) gives the outputs of one call."""
    C, T = 8, 30
    x = make(1, 2, T, 12, 20, 5, n=2)
    kw = dict(chunk_size=C, top_k=2, backend="torch")
    o = bsbr_attention(**x, **kw)
    seq = {n_: x[n_] for n_ in ("q", "k", "v", "r", "hk")}
    first = {n_: t[:, :, :split] for n_, t in seq.items()}
    o1 = bsbr_attention(**first, bank_F=x["bank_F"], bank_h=x["bank_h"], **kw)
    F1, h1 = chunk_states(first["k"], first["v"], first["hk"], chunk_size=C)
    offset = split % C
    start = split - offset
    o2 = bsbr_attention(q=x["q"][:, :, split:], r=x["r"][:, :, split:], k=x["k"][:, :, start:],
                        v=x["v"][:, :, start:], hk=x["hk"][:, :, start:], offset=offset,
                        bank_F=torch.cat([x["bank_F"], F1], 2),
                        bank_h=torch.cat([x["bank_h"], h1], 2), **kw)
    assert_rel_close(torch.cat([o1, o2], 2), o, 1e-6)


def test_torch_backend_causality():
    x = make(1, 2, 30, 12, 20, 5, n=2)
    kw = dict(chunk_size=8, top_k=2, backend="torch")
    o = bsbr_attention(**x, **kw)
    for t in (0, 8, 17, 29):
        y = dict(x)
        for n_ in ("q", "k", "v", "r", "hk"):
            y[n_] = x[n_].clone()
            y[n_][:, :, t] += torch.randn_like(y[n_][:, :, t])
        o2 = bsbr_attention(**y, **kw)
        assert torch.equal(o2[:, :, :t], o[:, :, :t]), f"token {t} moved an earlier output"
        assert not torch.allclose(o2[:, :, t:], o[:, :, t:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_long_scale_scales_only_the_routed_term(kernel_device, backend):
    """out(λ) = local + λ · long: the local softmax and the routing are untouched, so
    out(λ) - out(1) = (λ - 1) · long with long = out(1) - out(λ → 0) read off the reference;
    every input gradient against the float64 reference at the same λ. Also the decode step."""
    x = {n: t.to(kernel_device) for n, t in make(1, 2, 37, 12, 10, 6, offset=3, n=2).items()}
    do = torch.randn(1, 2, 37, 10, dtype=f64, device=kernel_device)
    lam = 0.37
    kw = dict(chunk_size=8, top_k=2, offset=3)
    o, w, g = run(bsbr_attention, x, do, long_scale=lam, backend=backend, **kw)
    o_r, w_r, g_r = run(bsbr_attention_ref, {n: t.double() for n, t in x.items()}, do,
                        long_scale=lam, **kw)
    assert_rel_close(o, o_r, 1e-5, "o")
    assert_rel_close(w, w_r, 1e-5, "slot weights")
    for name in NAMES:
        assert_rel_close(g[name], g_r[name], 1e-5, "d" + name)
    # The reference itself: linear in λ, with the λ = 1 output at one end.
    xd = {n: t.double() for n, t in x.items()}
    o1 = bsbr_attention_ref(**xd, **kw)
    o0 = bsbr_attention_ref(**xd, long_scale=1e-30, **kw)
    assert_rel_close(o_r, o0 + lam * (o1 - o0), 1e-12, "o(λ) = local + λ long")
    assert not torch.allclose(o1, o0)                 # the routed term is really there
    q1, r1 = x["q"][:, :, 0], x["r"][:, :, 0]
    s, ws = routed_readout_step(q1, r1, x["bank_F"], x["bank_h"], 1, long_scale=lam)
    s_r, ws_r = routed_readout_step_ref(q1.double(), r1.double(), x["bank_F"].double(),
                                        x["bank_h"].double(), 1, long_scale=lam)
    assert_rel_close(s, s_r, 1e-5, "step long")
    assert torch.equal(ws > 0, ws_r > 0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "1", None])
def test_long_scale_rejects_bad_values(bad):
    x = make(1, 1, 9, 4, 4, 3)
    with pytest.raises(ValueError, match="long_scale"):
        bsbr_attention(**x, chunk_size=4, long_scale=bad)
    with pytest.raises(ValueError, match="long_scale"):
        routed_readout_step(x["q"][:, :, 0], x["r"][:, :, 0], torch.zeros(1, 1, 2, 4, 4),
                            torch.zeros(1, 1, 2, 3), long_scale=bad)

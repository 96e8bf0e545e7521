"""Packed sequences (cu_seqlens) in kernels.bsbr: on every backend, bsbr_attention's output, slot
weights and the gradients of q, k, v, r, hk, chunk_local_attention and chunk_states against the
float64 reference called on each sequence alone; the refusals. The Triton kernels run under
TRITON_INTERPRET=1 on the CPU (float32, and float16 with 16-bit readout products)."""
import itertools

import pytest
import torch

from helpers import assert_rel_close
from kernels.bsbr import (BSBRLaunch, ReadoutLaunch, VarlenStates, bsbr_attention,
                          bsbr_attention_ref, chunk_local_attention, chunk_local_attention_ref,
                          chunk_states, chunk_states_ref)
from kernels.bsbr.naive import per_sequence
from kernels.varlen import unpack

f64, fp32, fp16 = torch.float64, torch.float32, torch.float16
TOL = {f64: 1e-10, fp32: 2e-5, fp16: 4e-3}
C, H, K, V, M = 8, 2, 12, 20, 5
NAMES = ("q", "k", "v", "r", "hk")
# Lengths not multiples of C, sequences of one partial chunk (5, 1, 3), of several chunks with a
# tail (17, 30), an exact multiple (8, 16), an empty one (0); "short": nothing to route to.
LENGTHS = {"mixed": (5, 17, 0, 8, 1, 30), "exact": (16, 3, 9), "short": (5, 1, 3)}
CASES = [("reference", f64), ("torch", fp32), ("triton", fp32), ("triton", fp16)]


def packed(lengths, dtype, device, dims=(K, K, V, M, M)):
    """Random q, k, v, r, hk [1, H, total, ·] and cu_seqlens [N + 1] int32."""
    total = sum(lengths)
    x = [torch.randn(1, H, total, d, device=device).to(dtype) for d in dims]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return x, cu


def grads_of(fn, leaves, do):
    """fn's output (the first if a tuple), the rest, and the gradients of sum(o · do)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    o, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    g = torch.autograd.grad((o.double() * do).sum(), leaves, materialize_grads=True)
    return o, rest, g


def launch_for(backend, dtype):
    """16-bit readout products for float16 (as bf16 runs them on a GPU by default)."""
    if backend == "triton" and dtype == fp16:
        return BSBRLaunch(readout=ReadoutLaunch(products="16bit"))
    return None


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("backend,dtype", CASES)
def test_bsbr_attention_varlen(poison_empty, kernel_device, backend, dtype, top_k, lengths):
    x, cu = packed(lengths, dtype, kernel_device)
    do = torch.randn(1, H, sum(lengths), V, dtype=f64, device=kernel_device)
    kw = dict(chunk_size=C, top_k=top_k, long_scale=0.5, return_slot_weights=True)
    o, (w,), g = grads_of(
        lambda *a: bsbr_attention(*a, **kw, cu_seqlens=cu, backend=backend,
                                  launch=launch_for(backend, dtype)), x, do)
    o_r, (w_r,), g_r = grads_of(lambda *a: per_sequence(bsbr_attention_ref, cu, *a, **kw),
                                [t.double() for t in x], do)
    assert o.dtype == dtype and o.shape == o_r.shape
    assert w.shape == w_r.shape == (1, H, 0)             # no bank: no bank slot weights
    assert_rel_close(o, o_r, TOL[dtype], "o")
    for name, a, b in zip(NAMES, g, g_r):
        if name == "r" and lengths == LENGTHS["short"]:
            assert not a.any() and not b.any()            # nothing routed: no gradient
        else:
            assert_rel_close(a, b, TOL[dtype], "d" + name)


def test_sequences_do_not_see_each_other(kernel_device):
    """A change anywhere in one sequence moves no output of another (Triton, top-k)."""
    x, cu = packed((13, 20, 11), fp32, kernel_device)
    kw = dict(chunk_size=C, top_k=2, cu_seqlens=cu, backend="triton")
    o = bsbr_attention(*x, **kw)
    x2 = [t.clone() for t in x]
    for t in x2:
        t[:, :, 13:33] = torch.randn_like(t[:, :, 13:33])     # the middle sequence, everywhere
    o2 = bsbr_attention(*x2, **kw)
    assert torch.equal(o[:, :, :13], o2[:, :, :13]) and torch.equal(o[:, :, 33:], o2[:, :, 33:])
    assert not torch.equal(o[:, :, 13:33], o2[:, :, 13:33])


@pytest.mark.parametrize("backend,dtype", CASES)
def test_chunk_local_attention_varlen(kernel_device, backend, dtype):
    x, cu = packed(LENGTHS["mixed"], dtype, kernel_device, dims=(K, K, V))
    do = torch.randn(1, H, sum(LENGTHS["mixed"]), V, dtype=f64, device=kernel_device)
    o, _, g = grads_of(lambda *a: chunk_local_attention(*a, chunk_size=C, cu_seqlens=cu,
                                                        backend=backend), x, do)
    o_r, _, g_r = grads_of(lambda *a: per_sequence(chunk_local_attention_ref, cu, *a,
                                                   chunk_size=C), [t.double() for t in x], do)
    assert_rel_close(o, o_r, TOL[dtype], "o")
    for name, a, b in zip("qkv", g, g_r):
        assert_rel_close(a, b, TOL[dtype], "d" + name)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_chunk_states_varlen(kernel_device, backend, dtype):
    """Each sequence's complete chunks, packed along the chunk axis with their offsets, and the
    lengths of the partial tails; gradients through F and h."""
    lengths = LENGTHS["mixed"]
    x, cu = packed(lengths, dtype, kernel_device, dims=(K, V, M))
    st = chunk_states(*x, chunk_size=C, cu_seqlens=cu, backend=backend)
    assert isinstance(st, VarlenStates)
    full = [L // C for L in lengths]
    assert st.cu_chunks.tolist() == [0, *itertools.accumulate(full)]
    assert st.cu_chunks.dtype == cu.dtype
    assert st.tails.tolist() == [L % C for L in lengths]
    leaves = [t.double().requires_grad_() for t in x]
    F_r, h_r = per_sequence(chunk_states_ref, cu, *leaves, chunk_size=C)
    assert_rel_close(st.F, F_r, TOL[dtype], "F")
    assert_rel_close(st.h, h_r, TOL[dtype], "h")
    # sequence 1 (17 tokens) alone: its 2 chunks, its tail of 1
    a, b = st.cu_chunks[1].item(), st.cu_chunks[2].item()
    F1, _ = chunk_states_ref(*(t[:, :, 5:22].double() for t in x), chunk_size=C)
    assert_rel_close(st.F[:, :, a:b], F1, TOL[dtype], "F of sequence 1")
    # right-padded per sequence, as a cache of N rows takes it
    padded = unpack(st.F, st.cu_chunks)
    assert padded.shape == (len(lengths), H, max(full), K, V)
    dF = torch.randn_like(F_r)
    dh = torch.randn_like(h_r)
    leaves2 = [t.detach().clone().requires_grad_() for t in x]
    st2 = chunk_states(*leaves2, chunk_size=C, cu_seqlens=cu, backend=backend)
    g = torch.autograd.grad((st2.F.double() * dF).sum() + (st2.h.double() * dh).sum(), leaves2)
    g_r = torch.autograd.grad((F_r * dF).sum() + (h_r * dh).sum(), leaves)
    for name, a, b in zip(("k", "v", "hk"), g, g_r):
        assert_rel_close(a, b, TOL[dtype], "d" + name)


@pytest.mark.parametrize("bad,exc,words", [
    (dict(offset=3), ValueError, ("offset", "cu_seqlens", "3")),
    (dict(bank=2), ValueError, ("bank_F", "cu_seqlens", "2 bank slots")),
    (dict(batch=2), ValueError, ("cu_seqlens", "batch of 2")),
    (dict(cu=[0, 5, 3, 12]), ValueError, ("cu_seqlens", "non-decreasing")),
    (dict(cu=[0, 5, 11]), ValueError, ("cu_seqlens", "12")),
    (dict(cu_dtype=torch.float32), ValueError, ("cu_seqlens", "int32")),
])
def test_varlen_refusals(bad, exc, words):
    lengths = (5, 7)
    T = 12 + bad.get("offset", 0)
    B = bad.get("batch", 1)
    x = dict(q=torch.randn(B, H, 12, K), k=torch.randn(B, H, T, K), v=torch.randn(B, H, T, V),
             r=torch.randn(B, H, 12, M), hk=torch.randn(B, H, T, M))
    if "bank" in bad:
        x.update(bank_F=torch.randn(B, H, bad["bank"], K, V),
                 bank_h=torch.randn(B, H, bad["bank"], M))
    cu = torch.tensor(bad.get("cu", [0, *itertools.accumulate(lengths)]),
                      dtype=bad.get("cu_dtype", torch.int32))
    with pytest.raises(exc) as e:
        bsbr_attention(**x, chunk_size=C, offset=bad.get("offset", 0), cu_seqlens=cu)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {e.value}"

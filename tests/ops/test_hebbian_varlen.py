"""Varlen Hebbian attention (cu_seqlens): N sequences packed along time into one row, each
computed as if called alone, on every backend, against float64 autograd of the quadratic form
called once per sequence.

Loss for every gradient check: (o·do).sum() + (S·dS).sum() with random do, dS, a random initial
state per sequence and (where on) a decay per head, so every gradient path (q, k, v, the
initial states, the decay) is exercised. Lengths are awkward on purpose: an empty sequence, a
one-token one, lengths off the chunk, one sequence several chunks long.
"""
import pytest
import torch

from helpers import assert_rel_close
from kernels import ChunkLaunch, hebbian_attention, hebbian_quadratic
import kernels.hebbian.function as hebbian_function

LENGTHS = (37, 0, 100, 1, 32, 19)           # at chunk 32: 2, 0, 4, 1, 1, 1 chunks
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# Small tiles on any device (the interpreter is slow); K = 20 spans two 16-wide fused K tiles.
SPLIT = ChunkLaunch(mode="split", BT=32, BT_bwd=32, h_BK=16, h_BV=16, o_BV=16)
FUSED = ChunkLaunch(mode="fused", BT=32, BT_bwd=32, fused_BK=16, fused_BV=16)
BACKENDS = [("triton", SPLIT), ("triton", FUSED), ("torch", None), ("dense", None),
            ("reference", None)]


def cu_seqlens(lengths, device, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype,
                        device=device)


def packed_inputs(lengths, H, K, V, device, dtype=torch.float32, shared_v=False, decay=True):
    """q, k [1,H,T,K]; v [1,H|1,T,V]; initial states [N,H,K,V]; decay [H] (one head at γ = 1)."""
    T, N = sum(lengths), len(lengths)
    q = torch.randn(1, H, T, K, device=device).to(dtype)
    k = torch.randn(1, H, T, K, device=device).to(dtype)
    v = torch.randn(1, 1 if shared_v else H, T, V, device=device).to(dtype)
    h0 = torch.randn(N, H, K, V, device=device)
    g = None
    if decay:
        g = torch.rand(H, device=device) * 0.3 + 0.7
        g[0] = 1.0
    return q, k, v, h0, g


def grads_of(fn, q, k, v, h0, g, do, dS):
    """o, S and the gradients of (o·do) + (S·dS) w.r.t. q, k, v, h0 (and the decay)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_()
              for x in (q, k, v, h0, g)]
    o, S = fn(*leaves)
    ((o.double() * do).sum() + (S.double() * dS).sum()).backward()
    return o, S, [None if x is None else x.grad for x in leaves]


def per_sequence_reference(lengths, scale, strict):
    """The oracle: float64 `hebbian_quadratic` on each sequence alone, outputs concatenated."""
    def run(q, k, v, h0, g):
        outs, states, t0 = [], [], 0
        for n, L in enumerate(lengths):
            o, S = hebbian_quadratic(q[:, :, t0:t0 + L], k[:, :, t0:t0 + L], v[:, :, t0:t0 + L],
                                     scale=scale, strict=strict, decay=g,
                                     initial_state=h0[n:n + 1])
            outs.append(o)
            states.append(S)
            t0 += L
        return torch.cat(outs, 2), torch.cat(states, 0)
    return run


def check_varlen(lengths, H, K, V, device, *, backend, launch, strict, decay, shared_v,
                 dtype=torch.float32, scale=0.4, chunk_size=None):
    """o, S_final and every gradient of one varlen call against the per-sequence oracle."""
    q, k, v, h0, g = packed_inputs(lengths, H, K, V, device, dtype, shared_v, decay)
    cu = cu_seqlens(lengths, device)
    do = torch.randn(1, H, sum(lengths), V, dtype=torch.float64, device=device)
    dS = torch.randn(len(lengths), H, K, V, dtype=torch.float64, device=device)
    o, S, grads = grads_of(
        lambda q_, k_, v_, h_, g_: hebbian_attention(
            q_, k_, v_, scale=scale, strict=strict, decay=g_, initial_state=h_,
            output_final_state=True, cu_seqlens=cu, backend=backend, launch=launch,
            chunk_size=chunk_size),
        q, k, v, h0, g, do, dS)
    o_r, S_r, grads_r = grads_of(per_sequence_reference(lengths, scale, strict),
                                 *(None if x is None else x.double() for x in (q, k, v, h0, g)),
                                 do, dS)
    assert o.dtype == dtype and o.shape == o_r.shape
    assert S.dtype == torch.float32 and S.shape == (len(lengths), H, K, V)
    tol = TOL[dtype]
    assert_rel_close(o, o_r, tol, "o")
    assert_rel_close(S, S_r, tol, "S_final")
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state", "ddecay"), grads, grads_r):
        if b is None:
            continue
        assert a is not None, f"{backend}: no gradient for {name}"
        assert_rel_close(a, b, 20 * tol if name == "ddecay" else tol, name)


@pytest.mark.parametrize("backend,launch", BACKENDS,
                         ids=["triton_split", "triton_fused", "torch", "dense", "reference"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
def test_varlen_matches_each_sequence_alone(kernel_device, poison_empty, backend, launch,
                                            strict, decay):
    """H = 2, K = 20, V = 12, v shared by the heads when strict (per head when inclusive)."""
    check_varlen(LENGTHS, 2, 20, 12, kernel_device, backend=backend, launch=launch,
                 strict=strict, decay=decay, shared_v=strict)


@pytest.mark.parametrize("launch", [SPLIT, FUSED], ids=["split", "fused"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
def test_varlen_triton_fp16(kernel_device, poison_empty, launch, strict):
    check_varlen(LENGTHS, 3, 20, 12, kernel_device, backend="triton", launch=launch,
                 strict=strict, decay=True, shared_v=not strict, dtype=torch.float16)


@pytest.mark.parametrize("mode,bt,bt_bwd", [("split", 16, 32), ("fused", 32, 16)])
def test_varlen_segments_carry_the_state(kernel_device, poison_empty, monkeypatch, mode, bt,
                                         bt_bwd):
    """Segments of 32 tokens (one cut unit of the larger chunk): the 100-token sequence spans
    four segments (its state crosses three boundaries in the carry, forward and backward), and
    forward and backward chunks differ (both cut at the same tokens)."""
    monkeypatch.setattr(hebbian_function, "SEGMENT_TOKENS", 32)
    launch = ChunkLaunch(mode=mode, BT=bt, BT_bwd=bt_bwd, h_BK=16, h_BV=16, o_BV=16,
                         fused_BK=16, fused_BV=16)
    check_varlen(LENGTHS, 2, 20, 12, kernel_device, backend="triton", launch=launch,
                 strict=True, decay=True, shared_v=True)


def test_varlen_many_short_sequences_split_by_rows(kernel_device, poison_empty, monkeypatch):
    """A segment holds at most MAX_GRID_BH // H sequences (the state kernels' grid axis): with
    the cap at 3 rows, eleven short sequences take four segments, none of them cut."""
    monkeypatch.setattr(hebbian_function, "MAX_GRID_BH", 6)
    check_varlen((3, 0, 5, 1, 2, 7, 0, 4, 1, 6, 2), 2, 20, 12, kernel_device, backend="triton",
                 launch=SPLIT, strict=False, decay=True, shared_v=False)


@pytest.mark.parametrize("launch", [SPLIT, FUSED], ids=["split", "fused"])
def test_varlen_no_grad_segments_leave_initial_state(kernel_device, poison_empty, monkeypatch,
                                                     launch):
    """Inference across segments: the carries never touch the caller's initial states, and a
    call that keeps no final state returns None."""
    monkeypatch.setattr(hebbian_function, "SEGMENT_TOKENS", 32)
    q, k, v, h0, g = packed_inputs(LENGTHS, 2, 20, 12, kernel_device)
    h0_copy = h0.clone()
    cu = cu_seqlens(LENGTHS, kernel_device, torch.int64)
    with torch.no_grad():
        o, S = hebbian_attention(q, k, v, decay=g, initial_state=h0, output_final_state=True,
                                 cu_seqlens=cu, backend="triton", launch=launch)
        o_none, S_none = hebbian_attention(q, k, v, decay=g, initial_state=h0, cu_seqlens=cu,
                                           backend="triton", launch=launch)
    assert torch.equal(h0, h0_copy) and S_none is None
    o_r, S_r = per_sequence_reference(LENGTHS, 1.0, True)(q.double(), k.double(), v.double(),
                                                          h0.double(), g.double())
    assert_rel_close(o, o_r, 1e-5, "o")
    assert_rel_close(o_none, o_r, 1e-5, "o (no final state)")
    assert_rel_close(S, S_r, 1e-5, "S_final")


@pytest.mark.parametrize("backend,launch", BACKENDS,
                         ids=["triton_split", "triton_fused", "torch", "dense", "reference"])
def test_varlen_without_initial_or_final_state(kernel_device, poison_empty, backend, launch):
    """No initial state (zeros) and no final state: o and the gradients of q, k, v and the
    decay from (o·do) alone."""
    q, k, v, _, g = packed_inputs(LENGTHS, 2, 20, 12, kernel_device, shared_v=True)
    cu = cu_seqlens(LENGTHS, kernel_device)
    do = torch.randn(1, 2, sum(LENGTHS), 12, dtype=torch.float64, device=kernel_device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o, S = hebbian_attention(*leaves[:3], decay=leaves[3], cu_seqlens=cu, backend=backend,
                             launch=launch)
    assert S is None
    (o.double() * do).sum().backward()
    ref = [x.double().requires_grad_() for x in (q, k, v, g)]
    zeros = torch.zeros(len(LENGTHS), 2, 20, 12, dtype=torch.float64, device=kernel_device)
    o_r, _ = per_sequence_reference(LENGTHS, 1.0, True)(*ref[:3], zeros, ref[3])
    (o_r * do).sum().backward()
    assert_rel_close(o, o_r, 1e-5, "o")
    for name, a, b in zip(("dq", "dk", "dv", "ddecay"), leaves, ref):
        assert_rel_close(a.grad, b.grad, 2e-4 if name == "ddecay" else 1e-5, name)


@pytest.mark.parametrize("backend", ["triton", "torch", "dense", "reference"])
def test_varlen_of_empty_sequences_only(kernel_device, backend):
    """Three empty sequences, no token: the final states are copies of the initial ones."""
    q, k, v, h0, _ = packed_inputs((0, 0, 0), 2, 8, 4, kernel_device)
    o, S = hebbian_attention(q, k, v, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu_seqlens((0, 0, 0), kernel_device), backend=backend)
    assert o.shape == (1, 2, 0, 4)
    assert torch.equal(S, h0) and S.data_ptr() != h0.data_ptr()


def test_one_sequence_equals_the_dense_call(kernel_device):
    """cu_seqlens = [0, T] is the dense call of batch 1 (same kernels, same chunks)."""
    q, k, v, h0, g = packed_inputs((70,), 2, 20, 12, kernel_device)
    kw = dict(decay=g, initial_state=h0, output_final_state=True, backend="triton",
              launch=SPLIT)
    o, S = hebbian_attention(q, k, v, cu_seqlens=cu_seqlens((70,), kernel_device), **kw)
    o_d, S_d = hebbian_attention(q, k, v, **kw)
    assert_rel_close(o, o_d, 1e-6, "o")
    assert_rel_close(S, S_d, 1e-6, "S_final")


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_refusals_name_the_argument(backend):
    q, k, v, h0, _ = packed_inputs((3, 4), 2, 8, 4, "cpu")
    cu = cu_seqlens((3, 4), "cpu")
    with pytest.raises(ValueError, match="cu_seqlens: .*batch size 1"):
        hebbian_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                          v.expand(2, -1, -1, -1), cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[N,H,K,V\] = "
                                         r"\[2, 2, 8, 4\], got \[1, 2, 8, 4\]"):
        hebbian_attention(q, k, v, initial_state=h0[:1], cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens: expected offsets from 0 to the packed "
                                         "length 7"):
        hebbian_attention(q, k, v, cu_seqlens=cu_seqlens((3, 5), "cpu"), backend=backend)
    with pytest.raises(TypeError, match="cu_seqlens: expected an int32 or int64 tensor"):
        hebbian_attention(q, k, v, cu_seqlens=[0, 3, 7], backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens: expected device cpu"):
        hebbian_attention(q, k, v, cu_seqlens=cu.to("meta"), backend=backend)

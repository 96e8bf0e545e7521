"""The Triton Hebbian attention kernels (chunked forward/backward and the decode step) against
the float64 reference. On the CPU they run under TRITON_INTERPRET=1 (set by conftest), in
float32 and float16 only (the interpreter mishandles bf16); GPU tests are marked `gpu`.

Loss for every gradient check: (o·do).sum() + (S·dS).sum() with random do, dS and a random
initial state, so every gradient path (initial_state included) is exercised.
"""
import dataclasses

import pytest
import torch

from helpers import assert_rel_close
from kernels import (ChunkLaunch, StepLaunch, hebbian_attention, hebbian_quadratic,
                     hebbian_recurrent, hebbian_step)
import kernels.hebbian.plan as hebbian_plan
import kernels.hebbian.function as hebbian_function

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The fused forward on 32-wide tiles, on any device: K = 40 spans two K tiles (atomics).
FUSED = ChunkLaunch(mode="fused", h_BK=64, o_BV=64, fused_BK=32, fused_BV=32)


def make_inputs(B, H, T, K, V, dtype, device, shared_v=False, decay=False):
    q = torch.randn(B, H, T, K, device=device).to(dtype)
    k = torch.randn(B, H, T, K, device=device).to(dtype)
    v = torch.randn(B, 1 if shared_v else H, T, V, device=device).to(dtype)
    h0 = torch.randn(B, H, K, V, device=device)
    g = torch.rand(H, device=device) * 0.2 + 0.8 if decay else None
    if g is not None:
        g[0] = 1.0                                    # γ = 1 exactly: the no-decay path per head
    return q, k, v, h0, g


def run_and_grad(fn, q, k, v, h0, g, do, dS, **kw):
    """o, S and the gradients of (o·do).sum() + (S·dS).sum() w.r.t. q, k, v, h0."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
    o, S = fn(*leaves[:3], decay=g, initial_state=leaves[3], **kw)
    ((o.double() * do).sum() + (S.double() * dS).sum()).backward()
    return o, S, [x.grad for x in leaves]


def check_against_reference(q, k, v, h0, g, *, strict, scale, chunk_size, dtype, ref=None,
                            launch=None):
    """Forward (o, S) and all four gradients of the Triton path (with ``launch``) vs float64
    autograd of the reference; returns nothing, fails with the name of the first tensor out of
    tolerance."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    do = torch.randn(B, H, T, V, dtype=torch.float64, device=q.device)
    dS = torch.randn(B, H, K, V, dtype=torch.float64, device=q.device)
    o, S, grads = run_and_grad(hebbian_attention, q, k, v, h0, g, do, dS, scale=scale,
                               strict=strict, output_final_state=True, backend="triton",
                               chunk_size=chunk_size, launch=launch)
    ref = ref or hebbian_recurrent
    g64 = None if g is None else g.double()
    o_r, S_r, grads_r = run_and_grad(
        lambda q_, k_, v_, **kw: ref(q_, k_, v_, scale=scale, strict=strict, **kw),
        q.double(), k.double(), v.double(), h0.double(), g64, do, dS)
    assert o.dtype == v.dtype and o.shape == o_r.shape
    assert S.dtype == torch.float32
    tol = TOL[dtype]
    assert_rel_close(o, o_r, tol, "o")
    assert_rel_close(S, S_r, tol, "S_final")
    for name, gr, gr_r in zip(("dq", "dk", "dv", "d_initial_state"), grads, grads_r):
        assert gr.shape == gr_r.shape, name
        assert_rel_close(gr, gr_r, tol, name)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("shared_v", [False, True], ids=["v_per_head", "v_shared"])
def test_chunk_fwd_bwd_fp32(kernel_device, poison_empty, strict, decay, shared_v):
    # T=130 with chunk 64: two full chunks and a partial one; K, V not powers of two.
    q, k, v, h0, g = make_inputs(2, 3, 130, 40, 24, torch.float32, kernel_device, shared_v,
                                 decay)
    check_against_reference(q, k, v, h0, g, strict=strict, scale=0.37, chunk_size=64,
                            dtype=torch.float32)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
def test_chunk_fwd_bwd_fp16(kernel_device, poison_empty, strict):
    q, k, v, h0, g = make_inputs(2, 3, 130, 40, 24, torch.float16, kernel_device,
                                 shared_v=strict, decay=True)
    check_against_reference(q, k, v, h0, g, strict=strict, scale=0.2, chunk_size=64,
                            dtype=torch.float16)


@pytest.mark.parametrize("T", [1, 63])
def test_chunk_short_sequences(kernel_device, poison_empty, T):
    q, k, v, h0, g = make_inputs(1, 2, T, 24, 40, torch.float32, kernel_device, decay=True)
    check_against_reference(q, k, v, h0, g, strict=True, scale=1.0, chunk_size=64,
                            dtype=torch.float32, ref=hebbian_quadratic)


def test_chunk_many_segments(kernel_device, poison_empty, monkeypatch):
    """Segments of 32 tokens (chunks of 16): the state carry between segments in the forward,
    the boundary-state recompute and the dS carry in the backward."""
    monkeypatch.setattr(hebbian_function, "SEGMENT_TOKENS", 32)
    q, k, v, h0, g = make_inputs(1, 2, 75, 20, 18, torch.float32, kernel_device,
                                 shared_v=True, decay=True)
    check_against_reference(q, k, v, h0, g, strict=True, scale=0.5, chunk_size=16,
                            dtype=torch.float32)


def test_chunk_no_grad_segments_leave_initial_state(kernel_device, poison_empty, monkeypatch):
    """Inference across segments updates its carry in place: never the caller's state."""
    monkeypatch.setattr(hebbian_function, "SEGMENT_TOKENS", 16)
    q, k, v, h0, g = make_inputs(2, 2, 50, 20, 18, torch.float32, kernel_device)
    h0_copy = h0.clone()
    with torch.no_grad():
        o, S = hebbian_attention(q, k, v, initial_state=h0, output_final_state=True,
                                 backend="triton", chunk_size=16)
        o_none, S_none = hebbian_attention(q, k, v, initial_state=h0, backend="triton",
                                           chunk_size=16)
    assert torch.equal(h0, h0_copy)
    assert S_none is None
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), initial_state=h0.double())
    assert_rel_close(o, o_r, 1e-5, "o")
    assert_rel_close(o_none, o_r, 1e-5, "o (no final state)")
    assert_rel_close(S, S_r, 1e-5, "S_final")


def test_chunk_without_initial_state(kernel_device, poison_empty):
    q, k, v, _, _ = make_inputs(1, 2, 40, 16, 16, torch.float32, kernel_device)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    o, S = hebbian_attention(qs, ks, vs, output_final_state=True, backend="triton",
                             chunk_size=16)
    do, dS = torch.randn_like(o), torch.randn_like(S)
    ((o * do).sum() + (S * dS).sum()).backward()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    o_r, S_r = hebbian_quadratic(q64, k64, v64)
    ((o_r * do.double()).sum() + (S_r * dS.double()).sum()).backward()
    assert_rel_close(o, o_r, 1e-5, "o")
    assert_rel_close(S, S_r, 1e-5, "S_final")
    for name, a, b in (("dq", qs, q64), ("dk", ks, k64), ("dv", vs, v64)):
        assert_rel_close(a.grad, b.grad, 1e-5, name)


# ----------------------------------------------------------------------------- fused forward
# The forward through chunk_hebbian_fwd_fused_kernel (launch FUSED; the backward is unchanged).

@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
def test_fused_forward_fp32(kernel_device, poison_empty, strict, decay):
    # K = 40 spans two 32-wide K tiles: the output is summed with atomics across them.
    q, k, v, h0, g = make_inputs(2, 3, 130, 40, 24, torch.float32, kernel_device,
                                 shared_v=strict, decay=decay)
    assert hebbian_plan.fused_needs_atomics(40, hebbian_plan.make_tiles(40, 24, 64, FUSED))
    check_against_reference(q, k, v, h0, g, strict=strict, scale=0.37, chunk_size=64,
                            dtype=torch.float32, launch=FUSED)


def test_fused_forward_fp16_one_k_tile(kernel_device, poison_empty):
    # K = 24 fits one tile: plain stores of the output, no float32 buffer.
    q, k, v, h0, g = make_inputs(1, 2, 75, 24, 40, torch.float16, kernel_device,
                                 shared_v=True, decay=True)
    assert not hebbian_plan.fused_needs_atomics(24, hebbian_plan.make_tiles(24, 40, 16, FUSED))
    check_against_reference(q, k, v, h0, g, strict=True, scale=0.2, chunk_size=16,
                            dtype=torch.float16, launch=FUSED)


def test_fused_forward_segments_no_grad(kernel_device, poison_empty, monkeypatch):
    monkeypatch.setattr(hebbian_function, "SEGMENT_TOKENS", 32)
    q, k, v, h0, g = make_inputs(2, 2, 70, 40, 18, torch.float32, kernel_device, decay=True)
    with torch.no_grad():
        o, S = hebbian_attention(q, k, v, decay=g, initial_state=h0, output_final_state=True,
                                 backend="triton", chunk_size=16, launch=FUSED)
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), decay=g.double(),
                                 initial_state=h0.double())
    assert_rel_close(o, o_r, 1e-5, "o")
    assert_rel_close(S, S_r, 1e-5, "S_final")


@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
def test_fused_forward_q_is_k(kernel_device, poison_empty, monkeypatch, decay):
    """BDH passes one tensor as q and k: the fused kernel then loads each tile once (SAME_QK).
    Output, final state and the one leaf's gradient (dq + dk) against float64 autograd."""
    import kernels.hebbian.chunk_output as chunk_output
    seen = []
    real = chunk_output.same_tensor
    monkeypatch.setattr(chunk_output, "same_tensor", lambda a, b: seen.append(real(a, b)) or
                        seen[-1])
    q, _, v, h0, g = make_inputs(1, 2, 90, 40, 24, torch.float32, kernel_device,
                                 shared_v=True, decay=decay)
    do = torch.randn(1, 2, 90, 24, dtype=torch.float64, device=kernel_device)
    outs = []
    for x, fn in ((q, lambda a, **kw: hebbian_attention(a, a, v, backend="triton",
                                                       chunk_size=32, output_final_state=True,
                                                       launch=FUSED, **kw)),
                  (q.double(), lambda a, **kw: hebbian_recurrent(a, a, v.double(), **kw))):
        leaf = x.detach().clone().requires_grad_()
        o, S = fn(leaf, scale=0.3, decay=None if g is None else g.to(x.dtype),
                  initial_state=h0.to(x.dtype))
        (o.double() * do).sum().backward()
        outs.append((o, S, leaf.grad))
    assert seen and all(seen), "the fused launch did not see q is k"
    for name, a, b in zip(("o", "S_final", "dq + dk"), *outs):
        assert_rel_close(a, b, 1e-5, name)


@pytest.mark.parametrize("mode,bt,bt_bwd", [("fused", 16, 32), ("split", 32, 16)])
def test_forward_and_backward_chunks_may_differ(kernel_device, poison_empty, monkeypatch,
                                                mode, bt, bt_bwd):
    """The backward may run at another chunk size than the forward: both must cut the
    sequence into the same segments (boundary states saved by one, used by the other)."""
    monkeypatch.setattr(hebbian_function, "SEGMENT_TOKENS", 64)
    launch = dataclasses.replace(FUSED, mode=mode, BT=bt, BT_bwd=bt_bwd)
    p = hebbian_plan.plan(1, 2, 40, 18, launch)
    assert (p.fused, p.BT, p.BT_bwd) == (mode == "fused", bt, bt_bwd)
    q, k, v, h0, g = make_inputs(1, 2, 150, 40, 18, torch.float32, kernel_device,
                                 shared_v=True, decay=True)
    check_against_reference(q, k, v, h0, g, strict=True, scale=0.5, chunk_size=None,
                            dtype=torch.float32, launch=launch)


def test_segment_tokens_are_a_multiple_of_both_chunks():
    from kernels.hebbian.function import _segment_tokens
    for bts in [(64, 128), (128, 64), (64, 64), (16, 32)]:
        for K, V in [(8192, 256), (128, 128), (40, 24)]:
            seg = _segment_tokens(4, 4, K, V, 2, bts)
            assert seg % max(bts) == 0 and seg > 0
    # BDH at bf16: a 16 MiB chunk state; the buffer at chunk 64 stays under 1 GiB
    assert _segment_tokens(1, 4, 8192, 256, 2, (64, 128)) == 64 * 64


def test_chunk_empty_sequence(kernel_device):
    q, k, v, h0, _ = make_inputs(1, 2, 0, 16, 8, torch.float32, kernel_device)
    o, S = hebbian_attention(q, k, v, initial_state=h0, output_final_state=True,
                             backend="triton")
    assert o.shape == (1, 2, 0, 8)
    assert torch.equal(S, h0) and S.data_ptr() != h0.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
def test_decode_steps_match_chunked(kernel_device, poison_empty, dtype, strict):
    """Token-by-token decoding from a random state equals the chunked forward, final state
    included; v shared by the heads and a decay on, K and V not powers of two."""
    B, H, T, K, V = 2, 3, 9, 40, 24
    q, k, v, h0, g = make_inputs(B, H, T, K, V, dtype, kernel_device, shared_v=True,
                                 decay=True)
    o_c, S_c = hebbian_attention(q, k, v, scale=0.5, strict=strict, decay=g, initial_state=h0,
                                 output_final_state=True, backend="triton", chunk_size=16)
    state = h0.clone()
    outs = []
    for t in range(T):
        o_t, state_t = hebbian_step(q[:, :, t], k[:, :, t], v[:, :, t], state, scale=0.5,
                                    strict=strict, decay=g, backend="triton")
        assert state_t is state                      # updated in place
        assert o_t.dtype == dtype and o_t.shape == (B, H, V)
        outs.append(o_t)
    o_s = torch.stack(outs, dim=2)
    # The chunked fp16 path rounds γ-weighted keys to fp16; the step keeps them in fp32.
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert_rel_close(o_s, o_c, tol, "decode o vs chunked o")
    assert_rel_close(state, S_c, tol, "decode state vs chunked S_final")
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), scale=0.5, strict=strict,
                                 decay=g.double(), initial_state=h0.double())
    assert_rel_close(o_s, o_r, TOL[dtype], "decode o vs reference")
    assert_rel_close(state, S_r, 1e-5, "decode state vs reference")


def test_decode_step_per_head_v_no_decay(kernel_device, poison_empty):
    B, H, K, V = 1, 2, 100, 70                      # several K tiles, a partial V tile
    q, k, v, h0, _ = make_inputs(B, H, 1, K, V, torch.float32, kernel_device)
    state = h0.clone()
    o, _ = hebbian_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, backend="triton")
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), initial_state=h0.double())
    assert_rel_close(o, o_r[:, :, 0], 1e-5, "o")
    assert_rel_close(state, S_r, 1e-6, "state")


# ------------------------------------------------------------------------------------------
# The GPU-default launches wherever the tests run: on the CPU the interpreter's own defaults
# are smaller, so these tests are what covers the production tiles there.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launch,plan", [
    (ChunkLaunch(), (False, 128, 128)),
    (ChunkLaunch(mode="fused"), (True, 64, 128)),
    (ChunkLaunch(mode="split", BT=64, BT_bwd=64), (False, 64, 64)),
], ids=["auto", "fused", "split64"])
def test_chunk_gpu_default_tiles(kernel_device, poison_empty, launch, plan):
    """K = 200, V = 160: the 128-wide K tiles of the state kernels and of the fused forward
    (two K tiles: atomics), and the output kernels' V tiles (128 wide at chunk 64, 64 at chunk
    128), full and partial. The rule makes "auto" the split forward at chunk 128 here."""
    B, H, T, K, V = 1, 2, 150, 200, 160
    p = hebbian_plan.plan(B, H, K, V, launch)
    assert (p.fused, p.BT, p.BT_bwd) == plan
    tiles = p.fwd_tiles(K, V)
    assert (tiles.h_BK, tiles.fused_BK, tiles.o_BV) == (128, 128, 128 if p.BT == 64 else 64)
    q, k, v, h0, g = make_inputs(B, H, T, K, V, torch.float32, kernel_device, shared_v=True,
                                 decay=True)
    check_against_reference(q, k, v, h0, g, strict=True, scale=0.1, chunk_size=None,
                            dtype=torch.float32, launch=launch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_step_gpu_default_tiles(kernel_device, poison_empty, dtype):
    """StepLaunch(): 128×128 state tiles; K = 200 and V = 160 take two each, the last partial."""
    B, H, K, V = 2, 2, 200, 160
    q, k, v, h0, g = make_inputs(B, H, 1, K, V, dtype, kernel_device, shared_v=True,
                                 decay=True)
    state = h0.clone()
    o, _ = hebbian_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, scale=0.5, decay=g,
                        backend="triton", launch=StepLaunch())
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), scale=0.5,
                                 decay=g.double(), initial_state=h0.double())
    assert_rel_close(o, o_r[:, :, 0], TOL[dtype], "o")
    assert_rel_close(state, S_r, 1e-6, "state")


# ------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the BDH shape, and a tensor past 2^31 elements.
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["split", "fused", "auto"])
def test_gpu_bdh_shape(dtype, mode):
    """B1 H4 T4096 K8192 V256, v shared, decay on, against float64 autograd of the quadratic
    form on the GPU, with either forward algorithm. Inputs scaled like BDH's (ReLU-sparse-ish
    magnitudes don't matter here)."""
    dev = torch.device("cuda")
    B, H, T, K, V = 1, 4, 4096, 8192, 256
    q, k, v, h0, g = make_inputs(B, H, T, K, V, dtype, dev, shared_v=True, decay=True)
    check_against_reference(q, k, v, h0, g, strict=True, scale=K ** -0.5,
                            chunk_size=None if mode == "auto" else 64, dtype=dtype,
                            ref=hebbian_quadratic,
                            launch=None if mode == "auto" else ChunkLaunch(mode=mode))
    state = h0.clone()
    o_s, _ = hebbian_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, scale=K ** -0.5,
                          decay=g, backend="triton")
    o_c, S_c = hebbian_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], scale=K ** -0.5,
                                 decay=g, initial_state=h0, output_final_state=True,
                                 backend="triton")
    assert_rel_close(o_s, o_c[:, :, 0], 1e-2, "decode o")
    assert_rel_close(state, S_c, 1e-5, "decode state")


@pytest.mark.gpu
def test_gpu_past_int32_indexing():
    """q and k hold more than 2^31 elements (B1 H1 T=266240 K=8192 bf16, 4.4 GB each): the
    tail of o, the final state and the tail's gradients against the torch chunk path."""
    from kernels import chunk_hebbian_torch
    dev = torch.device("cuda")
    B, H, T, K, V, W = 1, 1, 266240, 8192, 256, 256
    assert B * H * T * K > 2 ** 31
    scale = K ** -0.5
    q, k, v, h0, g = make_inputs(B, H, T, K, V, torch.bfloat16, dev, decay=True)
    g.fill_(0.999)
    leaves = [x.requires_grad_() for x in (q, k, v)]            # no copies: 4.4 GB each
    o, S = hebbian_attention(*leaves, scale=scale, decay=g, initial_state=h0,
                             output_final_state=True, backend="triton")
    do = torch.randn_like(o)
    dS = torch.randn_like(S)
    ((o * do).float().sum() + (S * dS).sum()).backward()
    with torch.no_grad():
        _, S_pre = chunk_hebbian_torch(q[:, :, :T - W], k[:, :, :T - W], v[:, :, :T - W],
                                       scale=scale, decay=g, initial_state=h0, chunk_size=64)
    tail = [x.detach()[:, :, T - W:].float().requires_grad_() for x in (q, k, v)]
    o_r, S_r = chunk_hebbian_torch(*tail, scale=scale, decay=g, initial_state=S_pre,
                                   chunk_size=64)
    ((o_r * do[:, :, T - W:].float()).sum() + (S_r * dS).sum()).backward()
    assert_rel_close(o[:, :, T - W:], o_r, 1e-2, "o tail")
    assert_rel_close(S, S_r, 1e-2, "S_final")
    for name, x, x_r in zip(("dq", "dk", "dv"), leaves, tail):
        assert_rel_close(x.grad[:, :, T - W:], x_r.grad, 1e-2, name + " tail")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["split", "fused"])
def test_gpu_k128_both_forwards(mode):
    """K = V = 128 in bf16: one K tile covers K, so the fused forward stores O directly."""
    q, k, v, h0, g = make_inputs(2, 4, 1000, 128, 128, torch.bfloat16, torch.device("cuda"),
                                 decay=True)
    check_against_reference(q, k, v, h0, g, strict=True, scale=128 ** -0.5, chunk_size=64,
                            dtype=torch.bfloat16, ref=hebbian_quadratic,
                            launch=ChunkLaunch(mode=mode))

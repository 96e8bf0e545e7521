"""Edge cases of the Hebbian kernels: the decay's gradient on every backend, float16 states
past 65504, decays that underflow in float32, T = 0, bf16 under the interpreter, a
differentiable-looking decode step, argument types, determinism, the chunk cap, the grid limit,
tiles crossed at K = 100/130 and V = 72, and autocast in the fused q = k path.
"""
import math

import numpy as np
import pytest
import torch

from helpers import assert_rel_close
from kernels import ChunkLaunch, hebbian_attention, hebbian_recurrent, hebbian_step
import kernels.hebbian.plan as hebbian_plan
from kernels.launch import INTERPRET


def _inputs(B, H, T, K, V, device, dtype=torch.float32, shared_v=False):
    q = torch.randn(B, H, T, K, device=device).to(dtype)
    k = torch.randn(B, H, T, K, device=device).to(dtype)
    v = torch.randn(B, 1 if shared_v else H, T, V, device=device).to(dtype)
    h0 = torch.randn(B, H, K, V, device=device)
    return q, k, v, h0


def _grads(fn, q, k, v, h0, g, do, dS, **kw):
    """o, S and the gradients of (o·do) + (S·dS) w.r.t. q, k, v, h0 and the decay."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0, g)]
    o, S = fn(*leaves[:3], decay=leaves[4], initial_state=leaves[3], **kw)
    ((o.double() * do).sum() + (S.double() * dS).sum()).backward()
    return o, S, [x.grad for x in leaves]


# ------------------------------------------------------------------- decay gradient, tiles
@pytest.mark.parametrize("backend", ["triton", "torch", "dense"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
def test_decay_gradient_every_backend(kernel_device, backend, strict):
    """dL/dγ (and every other gradient) against float64 autograd of the recurrence, with small
    decays (γ down to 0.3), a state that matters (dS) and an initial state. K = 100 crosses the
    interpreter's 32/64-wide K tiles; V = 72 crosses the 64-wide V tile; T = 70 is not a
    multiple of the chunk."""
    B, H, T, K, V = 1, 3, 70, 100, 72
    q, k, v, h0 = _inputs(B, H, T, K, V, kernel_device, shared_v=strict)
    g = torch.tensor([0.3, 0.75, 1.0], device=kernel_device)
    do = torch.randn(B, H, T, V, dtype=torch.float64, device=kernel_device)
    dS = torch.randn(B, H, K, V, dtype=torch.float64, device=kernel_device)
    kw = dict(scale=0.3, strict=strict, output_final_state=True)
    o, S, grads = _grads(hebbian_attention, q, k, v, h0, g, do, dS, backend=backend,
                         chunk_size=32 if backend == "triton" else None, **kw)
    o_r, S_r, grads_r = _grads(
        lambda *a, output_final_state, **kw2: hebbian_recurrent(*a, **kw2),
        q.double(), k.double(), v.double(), h0.double(), g.double(), do, dS, **kw)
    assert_rel_close(o, o_r, 2e-5, "o")
    assert_rel_close(S, S_r, 2e-5, "S")
    for name, a, b in zip(("dq", "dk", "dv", "dh0", "ddecay"), grads, grads_r):
        assert a is not None, f"{backend}: no gradient for {name}"
        assert_rel_close(a, b, 2e-4 if name == "ddecay" else 2e-5, name)


def test_k130_crosses_tiles_triton(kernel_device):
    """K = 130 (three 64-wide tiles, one of 2 columns), V = 72, fp32, fused and split forward."""
    q, k, v, h0 = _inputs(2, 2, 40, 130, 72, kernel_device)
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), initial_state=h0.double())
    for mode in ("split", "fused"):
        launch = ChunkLaunch(mode=mode, BT=16, BT_bwd=16, h_BK=64, o_BK=64, dqk_BK=64,
                             fused_BK=64)
        o, S = hebbian_attention(q, k, v, initial_state=h0, output_final_state=True,
                                 backend="triton", launch=launch)
        assert_rel_close(o, o_r, 1e-5, f"o ({mode})")
        assert_rel_close(S, S_r, 1e-5, f"S ({mode})")


# ------------------------------------------------------------------------------ float16
def test_fp16_state_past_65504_stays_finite(kernel_device):
    """k, v of magnitude ~60 make the state pass 65504 within one chunk; the scaled output is
    small. float16 inputs must not overflow anywhere (states kept in float32)."""
    B, H, T, K, V = 1, 2, 48, 8, 16
    q = torch.randn(B, H, T, K, device=kernel_device).half()
    k = (torch.randn(B, H, T, K, device=kernel_device) * 60).half()
    v = (torch.randn(B, H, T, V, device=kernel_device) * 60).half()
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), scale=1e-3)
    assert S_r.abs().max() > 65504                         # the premise of the test
    o, S = hebbian_attention(q, k, v, scale=1e-3, output_final_state=True, backend="triton",
                             chunk_size=16)
    assert o.dtype == torch.float16
    assert_rel_close(o, o_r, 2e-3, "o")
    assert_rel_close(S, S_r, 1e-5, "S")


# ------------------------------------------------------------------------------ validation
def test_float64_decay_underflowing_float32_is_refused():
    q, k, v, _ = _inputs(1, 2, 8, 4, 4, "cpu", torch.float64)
    g = torch.tensor([1e-50, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="decay.*float32"):
        hebbian_attention(q, k, v, decay=g)


@pytest.mark.parametrize("backend", ["torch", "reference", "dense"])
def test_t0_returns_a_copy_of_the_initial_state(backend):
    q, k, v, h0 = _inputs(1, 2, 0, 4, 3, "cpu")
    o, S = hebbian_attention(q, k, v, initial_state=h0, output_final_state=True,
                             backend=backend)
    assert o.shape == (1, 2, 0, 3)
    assert S is not h0 and S.data_ptr() != h0.data_ptr()
    assert torch.equal(S, h0)


@pytest.mark.parametrize("name,kw,err,match", [
    ("decay list", dict(decay=[0.5, 0.5]), TypeError, "decay"),
    ("decay ndarray", dict(decay=np.ones(2)), TypeError, "decay"),
    ("state ndarray", dict(initial_state=np.zeros((1, 2, 4, 3), np.float32)), TypeError,
     "initial_state"),
    ("scale str", dict(scale="1"), TypeError, "scale"),
    ("scale tensor", dict(scale=torch.tensor(1.0)), TypeError, "scale"),
    ("scale nan", dict(scale=float("nan")), ValueError, "scale"),
    ("scale inf", dict(scale=math.inf), ValueError, "scale"),
    ("chunk 256", dict(chunk_size=256), ValueError, "chunk_size"),
    ("chunk bool", dict(chunk_size=True), ValueError, "chunk_size"),
])
def test_bad_argument_types_name_the_argument(name, kw, err, match):
    q, k, v, _ = _inputs(1, 2, 5, 4, 3, "cpu")
    with pytest.raises(err, match=match):
        hebbian_attention(q, k, v, **kw)


def test_step_refuses_inputs_that_require_grad():
    q, k, v, h0 = _inputs(1, 2, 1, 4, 3, "cpu")
    q1 = q[:, :, 0].clone().requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        hebbian_step(q1, k[:, :, 0], v[:, :, 0], h0.clone())
    with torch.no_grad():
        o, _ = hebbian_step(q1, k[:, :, 0], v[:, :, 0], h0.clone())
    assert_rel_close(o, torch.einsum("bhk,bhkv->bhv", q1.detach(), h0), 1e-6, "o")


def test_grid_limit_is_checked_before_launch(kernel_device):
    q = torch.randn(65536, 1, 2, 16, device=kernel_device)
    with pytest.raises(ValueError, match="grid limit"):
        hebbian_attention(q, q, q, backend="triton")


# ------------------------------------------------------------------------ interpreter, plan
@pytest.mark.skipif(not INTERPRET, reason="the interpreter's bf16 problem")
def test_bf16_under_the_interpreter_is_computed_in_float32():
    q, k, v, h0 = _inputs(1, 2, 20, 24, 16, "cpu", torch.bfloat16)
    o, S = hebbian_attention(q, k, v, initial_state=h0, output_final_state=True, scale=0.2,
                             backend="triton", chunk_size=16)
    o_r, S_r = hebbian_recurrent(q.double(), k.double(), v.double(), initial_state=h0.double(),
                                 scale=0.2)
    assert o.dtype == torch.bfloat16
    assert_rel_close(o, o_r, 1e-2, "o")
    assert_rel_close(S, S_r, 1e-5, "S")
    state = h0.clone()
    o1, _ = hebbian_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, scale=0.2,
                         backend="triton")
    assert_rel_close(o1, o_r[:, :, 0], 1e-2, "step o")


def test_deterministic_mode_avoids_the_atomic_forward(kernel_device):
    fused = ChunkLaunch(mode="fused", fused_BK=32)       # K = 40: two K tiles, atomics
    assert hebbian_plan.plan(1, 2, 40, 24, fused, 16).fused
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not hebbian_plan.plan(1, 2, 40, 24, fused, 16).fused
        assert hebbian_plan.plan(1, 2, 24, 24, fused, 16).fused      # one K tile: no atomics
        q, k, v, _ = _inputs(1, 2, 40, 40, 24, kernel_device)
        o1, _ = hebbian_attention(q, k, v, backend="triton", chunk_size=16, launch=fused)
        o2, _ = hebbian_attention(q, k, v, backend="triton", chunk_size=16, launch=fused)
        assert torch.equal(o1, o2)
    finally:
        torch.use_deterministic_algorithms(before)


# ------------------------------------------------------------------- fused q = k, autocast
def test_qk_dense_float32_input_under_bf16_autocast():
    from kernels.rope import rope_dense_attention
    xs = torch.randn(2, 2, 12, 16).relu()
    v = torch.randn(2, 1, 12, 8)
    ref_x, ref_v = xs.clone().requires_grad_(), v.clone().requires_grad_()
    o_ref = rope_dense_attention(ref_x, ref_v, 3)
    do = torch.randn_like(o_ref)
    (o_ref * do).sum().backward()
    x1, v1 = xs.clone().requires_grad_(), v.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = rope_dense_attention(x1, v1, 3)
    (o.float() * do).sum().backward()                      # raised a dtype error before
    assert x1.grad.dtype == torch.float32 and v1.grad.dtype == torch.float32
    assert_rel_close(o, o_ref, 3e-2, "o")
    assert_rel_close(x1.grad, ref_x.grad, 3e-2, "dxs")
    assert_rel_close(v1.grad, ref_v.grad, 3e-2, "dv")

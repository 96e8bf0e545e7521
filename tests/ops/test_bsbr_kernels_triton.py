"""The Triton kernels of kernels.bsbr (chunk-local attention, routed readout, and the whole
bsbr_attention on backend="triton") against float64 references, forward and the gradients of
every input. On the CPU they run under TRITON_INTERPRET=1 (set by conftest) in float32 and
float16; the bf16 tests at larger shapes are marked `gpu`."""
import pytest
import torch

import kernels.bsbr.readout_grouped as grouped
import kernels.bsbr.readout_triton as readout_triton
from helpers import assert_rel_close
from kernels.bsbr import (BSBRLaunch, LocalLaunch, ReadoutLaunch, RoutingLaunch, StatesLaunch,
                          bsbr_attention, bsbr_attention_ref, chunk_local_attention,
                          chunk_local_attention_ref, chunk_states, chunk_states_ref)
from kernels.bsbr.readout_triton import routed_readout_triton

f64, fp32, fp16 = torch.float64, torch.float32, torch.float16
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BACKWARD = {True: "one_pass", False: "two_pass", None: "auto"}
# GPU shapes are larger (K = 128, T ~ 1000): more rounding in the 16-bit backward
GPU_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def grads_of(fn, leaves, do):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    o = fn(*leaves)
    return o, torch.autograd.grad((o.double() * do).sum(), leaves)


@pytest.mark.parametrize("dtype,Tq,offset,C,K,V", [
    (fp32, 37, 0, 8, 12, 20), (fp32, 29, 5, 16, 33, 12), (fp32, 40, 0, 64, 12, 20),
    (fp32, 11, 2, 3, 12, 12), (fp32, 1, 100, 128, 12, 20), (fp32, 3, 70, 128, 12, 20),
    (fp16, 26, 3, 12, 20, 33), (fp16, 37, 0, 8, 12, 20)])
def test_local_triton(poison_empty, kernel_device, dtype, Tq, offset, C, K, V):
    Tk = Tq + offset
    x = [torch.randn(2, 3, T, d, device=kernel_device).to(dtype)
         for T, d in ((Tq, K), (Tk, K), (Tk, V))]
    do = torch.randn(2, 3, Tq, V, dtype=f64, device=kernel_device)
    kw = dict(chunk_size=C, offset=offset)
    o, g = grads_of(lambda *a: chunk_local_attention(*a, backend="triton", **kw), x, do)
    o_r, g_r = grads_of(lambda *a: chunk_local_attention_ref(*a, **kw), [t.double() for t in x], do)
    assert o.dtype == dtype
    assert_rel_close(o, o_r, TOL[dtype], "o")
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        assert_rel_close(a, b, TOL[dtype], name)


def dense_readout(q, F, idx, p):
    """long = Σ_j W_tj q_t F_j with W scattered from (idx, p): the readout without sparsity."""
    S = F.shape[2]
    W = torch.zeros(*idx.shape[:3], S + 1, dtype=p.dtype, device=p.device)
    W = W.scatter_add(-1, torch.where(idx >= 0, idx, S), p)[..., :S]
    return torch.einsum("bhtj,bhtk,bhjkv->bhtv", W, q, F)


@pytest.mark.parametrize("dtype,T,S,NK,K,V", [
    (fp32, 29, 7, 3, 12, 20), (fp32, 33, 5, 1, 33, 12), (fp32, 20, 4, 4, 20, 70),
    (fp16, 29, 6, 2, 12, 20)])
@pytest.mark.parametrize("mode", ["grouped", "tile"])
def test_readout_triton(poison_empty, kernel_device, mode, dtype, T, S, NK, K, V):
    q = torch.randn(2, 3, T, K, device=kernel_device).to(dtype)
    F = torch.randn(2, 3, S, K, V, device=kernel_device)
    p = torch.rand(2, 3, T, NK, device=kernel_device)
    # distinct slots per row, -1 for rows with no candidate and for some trailing entries
    idx = torch.rand(2, 3, T, S, device=kernel_device).argsort(-1)[..., :NK].to(torch.int32)
    idx[:, :, :4] = -1
    idx[:, :, 10:14, -1] = -1
    p = torch.where(idx >= 0, p, 0.0)
    do = torch.randn(2, 3, T, V, dtype=f64, device=kernel_device)
    leaves = [q, F, p]
    o, g = grads_of(lambda q_, F_, p_: routed_readout_triton(q_, F_, idx, p_,
                                                             ReadoutLaunch(mode=mode)), leaves, do)
    o_r, g_r = grads_of(lambda q_, F_, p_: dense_readout(q_, F_, idx.long(), p_),
                        [t.double() for t in leaves], do)
    assert o.dtype == torch.float32
    assert_rel_close(o, o_r, TOL[dtype], "long")
    g_r = list(g_r)
    g_r[2] = torch.where(idx >= 0, g_r[2], 0.0)      # dp of an empty entry is defined as 0
    for name, a, b in zip(("dq", "dF", "dp"), g, g_r):
        assert_rel_close(a, b, TOL[dtype], name)


@pytest.mark.parametrize("mode,fused", [("grouped", True), ("grouped", False), ("tile", None)])
def test_readout_with_runs_split_over_many_programs(poison_empty, kernel_device, monkeypatch,
                                                    mode, fused):
    """Skewed routing (slot 0 picked by every row) with 16-entry fwd / dq blocks and 16-entry dF
    segments: every slot's run spans several programs, and the per-slot sums of the dF partials
    still equal the float64 readout's gradients."""
    # V = 20: two V slices in the forward and in the dF pass (16-entry dots)
    launch = ReadoutLaunch(mode=mode, block=16, warps=2, block_v=16, backward=BACKWARD[fused],
                           df_block=16, df_block_v=16)
    monkeypatch.setattr(readout_triton, "segment_entries", lambda n_ent, S: 16)
    T, S, NK, K, V = 70, 5, 3, 12, 20
    q = torch.randn(1, 2, T, K, device=kernel_device)
    F = torch.randn(1, 2, S, K, V, device=kernel_device)
    p = torch.rand(1, 2, T, NK, device=kernel_device)
    idx = 1 + torch.rand(1, 2, T, S - 1, device=kernel_device).argsort(-1)[..., :NK]
    idx[..., 0] = 0                                  # 70 entries on slot 0: 5 segments
    idx[:, :, :3, 1:] = -1
    idx = idx.to(torch.int32)
    p = torch.where(idx >= 0, p, 0.0)
    do = torch.randn(1, 2, T, V, dtype=f64, device=kernel_device)
    o, g = grads_of(lambda q_, F_, p_: routed_readout_triton(q_, F_, idx, p_, launch),
                    [q, F, p], do)
    o_r, g_r = grads_of(lambda q_, F_, p_: dense_readout(q_, F_, idx.long(), p_),
                        [t.double() for t in (q, F, p)], do)
    assert_rel_close(o, o_r, TOL[fp32], "long")
    g_r = list(g_r)
    g_r[2] = torch.where(idx >= 0, g_r[2], 0.0)
    for name, a, b in zip(("dq", "dF", "dp"), g, g_r):
        assert_rel_close(a, b, TOL[fp32], name)


def readout_inputs(dev, dtype, T=29, S=6, NK=2, K=12, V=20):
    q = torch.randn(2, 3, T, K, device=dev).to(dtype)
    F = torch.randn(2, 3, S, K, V, device=dev)
    p = torch.rand(2, 3, T, NK, device=dev)
    idx = torch.rand(2, 3, T, S, device=dev).argsort(-1)[..., :NK].to(torch.int32)
    idx[:, :, :4] = -1
    p = torch.where(idx >= 0, p, 0.0)
    local = torch.randn(2, 3, T, V, device=dev).to(dtype)
    return q, F, idx, p, local


@pytest.mark.parametrize("dtype,lowp", [(fp32, False), (fp16, False), (fp16, True)])
@pytest.mark.parametrize("mode,fused", [("grouped", True), ("grouped", False), ("tile", None)])
def test_readout_adds_local_and_scale(poison_empty, kernel_device, mode, fused, dtype, lowp):
    """routed_readout_triton(local=, scale=): local + scale · long in local's dtype, and the
    gradients of q, F, p and local, against the float64 readout, with the one-pass backward
    (fused) and the two-pass one. In fp16 the backward gets a 16-bit gradient and hands it to
    the kernels as stored (lowp: 16-bit dq and dF products too)."""
    launch = ReadoutLaunch(mode=mode, products="16bit" if lowp else "float32",
                           backward=BACKWARD[fused])
    q, F, idx, p, local = readout_inputs(kernel_device, dtype)
    do = torch.randn(*local.shape, dtype=f64, device=kernel_device)
    lam = 0.37
    o, g = grads_of(lambda q_, F_, p_, l_: routed_readout_triton(
        q_, F_, idx, p_, launch, local=l_, scale=lam), [q, F, p, local], do)
    o_r, g_r = grads_of(lambda q_, F_, p_, l_: l_ + lam * dense_readout(q_, F_, idx.long(), p_),
                        [t.double() for t in (q, F, p, local)], do)
    assert o.dtype == dtype and g[3].dtype == dtype
    assert_rel_close(o, o_r, TOL[dtype], "o")
    g_r = list(g_r)
    g_r[2] = torch.where(idx >= 0, g_r[2], 0.0)
    for name, a, b in zip(("dq", "dF", "dp", "dlocal"), g, g_r):
        assert_rel_close(a, b, TOL[dtype], name)


def test_readout_rejects_a_local_of_the_wrong_shape(kernel_device):
    q, F, idx, p, local = readout_inputs(kernel_device, fp32)
    with pytest.raises(ValueError, match="local: expected shape"):
        routed_readout_triton(q, F, idx, p, local=local[:, :, :-1])


def test_bsbr_attention_sorts_the_picks_once(poison_empty, kernel_device, monkeypatch):
    """With the Triton routing and the grouped readout, one fwd + bwd sorts the picks once (the
    readout and the routing backward share the inverse index), and the gradients still match
    the float64 reference; a shared index refuses picks of another shape."""
    calls = []
    real = readout_triton._inverse_index

    def counted(idx, S):
        calls.append(tuple(idx.shape))
        return real(idx, S)
    # Every sort goes through readout_triton._inverse_index (the readout and the routing
    # backward reach it through readout_triton.inverse_index).
    monkeypatch.setattr(readout_triton, "_inverse_index", counted)
    B, H, T, K, V, M, C = 1, 2, 40, 12, 20, 5, 8
    dev = kernel_device
    x = [torch.randn(B, H, T, d, device=dev) for d in (K, K, V, M, M)]
    do = torch.randn(B, H, T, V, dtype=f64, device=dev)
    kw = dict(chunk_size=C, top_k=2)
    launch = BSBRLaunch(readout=ReadoutLaunch(mode="grouped"))
    o, g = grads_of(lambda *a: bsbr_attention(*a, **kw, backend="triton", launch=launch), x, do)
    assert calls == [(B, H, T, 2)]
    o_r, g_r = grads_of(lambda *a: bsbr_attention_ref(*a, **kw), [t.double() for t in x], do)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dr", "dhk"), (o, *g), (o_r, *g_r)):
        assert_rel_close(a, b, TOL[fp32], name)
    shared = readout_triton.SharedInverseIndex()
    idx = torch.zeros(1, 1, 4, 2, dtype=torch.int32, device=dev)
    shared.get(idx, 3)
    with pytest.raises(ValueError, match="SharedInverseIndex"):
        shared.get(idx[:, :, :2], 3)


def test_fused_backward_refuses_head_dims_over_its_tile(kernel_device):
    auto = ReadoutLaunch()
    assert grouped.use_fused_bwd(auto, 128, 128, True)
    assert not grouped.use_fused_bwd(auto, 129, 64, True)
    assert not grouped.use_fused_bwd(auto, 64, 64, False)     # float32 F: two passes by default
    assert not grouped.use_fused_bwd(ReadoutLaunch(backward="two_pass"), 64, 64, True)
    one_pass = ReadoutLaunch(backward="one_pass")
    assert grouped.use_fused_bwd(one_pass, 64, 64, False)
    q, F, idx, p, _ = readout_inputs(kernel_device, fp32, K=12, V=130)
    with pytest.raises(ValueError, match="ReadoutLaunch.backward.*V=130"):
        routed_readout_triton(q, F, idx, p, one_pass)          # refused before any work


def test_fused_backward_that_does_not_fit_falls_back_to_two_passes(poison_empty, kernel_device,
                                                                   monkeypatch):
    """A fused launch that raises Triton's OutOfResources (as too little shared memory would on
    a GPU) warns once, is remembered, and the two-pass backward gives the right gradients."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(grouped, "_FUSED_UNFIT", set())
    launches = []

    class Unfit:
        def __getitem__(self, grid):
            def launch(*a, **k):
                launches.append(grid)
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch
    monkeypatch.setattr(grouped, "_grouped_bwd_fused", Unfit())
    q, F, idx, p, _ = readout_inputs(kernel_device, fp32)
    do = torch.randn(*q.shape[:3], F.shape[-1], dtype=f64, device=kernel_device)
    launch = ReadoutLaunch(backward="one_pass")
    call = lambda q_, F_, p_: routed_readout_triton(q_, F_, idx, p_, launch)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="two-pass"):
        _, g = grads_of(call, [q, F, p], do)
    _, g2 = grads_of(call, [q, F, p], do)               # remembered: no second try, no warning
    assert len(launches) == 1 and len(grouped._FUSED_UNFIT) == 1
    _, g_r = grads_of(lambda q_, F_, p_: dense_readout(q_, F_, idx.long(), p_),
                      [t.double() for t in (q, F, p)], do)
    g_r = list(g_r)
    g_r[2] = torch.where(idx >= 0, g_r[2], 0.0)
    for name, a, a2, b in zip(("dq", "dF", "dp"), g, g2, g_r):
        assert_rel_close(a, b, TOL[fp32], name)
        assert torch.equal(a, a2)


@pytest.mark.parametrize("B,H,Tq,S,M,n,offset,C,kk", [
    (1, 2, 37, 7, 12, 0, 0, 5, 3), (2, 1, 70, 9, 20, 3, 5, 8, 4), (1, 1, 40, 40, 16, 0, 0, 1, 5),
    (1, 2, 33, 4, 8, 2, 0, 16, 4), (1, 1, 50, 6, 130, 1, 3, 9, 6)])
@pytest.mark.parametrize("tiles", [{}, {"block_q": 16, "block_s": 16}],
                         ids=["default", "small_tiles"])
def test_triton_routing_equals_the_torch_routing(kernel_device, monkeypatch, B, H, Tq, S, M, n,
                                                 offset, C, kk, tiles):
    """Top-k selection (same slots, same order, -1 where fewer than k are valid), the selected
    scores and the gradients of r and h, against the blockwise PyTorch form. Small tiles put
    several query blocks (different causal bounds) and several slot tiles (the merge rounds
    after the first tile) into the small shapes, and cut every slot's entries into segments of
    3 for dh (several partials per slot, summed in order)."""
    from kernels.bsbr.routing import _SelectedScores
    from kernels.bsbr.routing_triton import SelectedScoresTriton
    # Float32 FMAs: the exact-selection contract (the default tf32x3 may differ at near-ties
    # on a GPU: test_gpu_routing_tf32x3_agrees_with_ieee).
    launch = RoutingLaunch(precision="ieee", **tiles)
    if tiles:                    # dh's segments come from readout_triton.slot_segments
        monkeypatch.setattr(readout_triton, "segment_entries", lambda n_ent, S: 3)
    r = torch.randn(B, H, Tq, M, device=kernel_device)
    h = torch.randn(B, H, S, M, device=kernel_device)
    outs = []
    for triton_form in (False, True):
        r_, h_ = r.clone().requires_grad_(), h.clone().requires_grad_()
        if triton_form:
            idx, sel = SelectedScoresTriton.apply(r_, h_, n, offset, C, kk, None, launch)
        else:
            idx, sel = _SelectedScores.apply(r_, h_, n, offset, C, kk)
        g = torch.randn(sel.shape, generator=torch.Generator().manual_seed(1)).to(sel.device)
        dr, dh = torch.autograd.grad((torch.where(idx >= 0, sel, 0.0) * g).sum(), (r_, h_))
        outs.append((idx, sel, dr, dh))
    (i1, s1, dr1, dh1), (i2, s2, dr2, dh2) = outs
    assert i2.dtype == torch.int64 and torch.equal(i1, i2)
    assert (i1 == -1).any() and (i1 >= 0).any()          # the shapes cover both cases
    assert torch.equal(torch.isinf(s1), torch.isinf(s2))
    ok = i1 >= 0
    assert_rel_close(s2[ok], s1[ok], 1e-6, "selected scores")
    assert_rel_close(dr2, dr1, 1e-6, "dr")
    assert_rel_close(dh2, dh1, 1e-6, "dh")


@pytest.mark.gpu
def test_gpu_routing_tf32x3_agrees_with_ieee():
    """The default score precision (tf32x3) against float32 FMAs at a benchmark-like shape
    (B1 H4 T8192, chunk 128 → 64 slots, M 128, top-8): the same slots for all but near-ties and
    the same selected scores to float32 accuracy."""
    from kernels.bsbr.routing_triton import SelectedScoresTriton
    g = torch.Generator().manual_seed(3)
    r = (torch.randn(1, 4, 8192, 128, generator=g) / 128 ** 0.5).cuda().to(torch.bfloat16)
    h = (torch.randn(1, 4, 64, 128, generator=g) / 128 ** 0.5).cuda()
    idx, sel = SelectedScoresTriton.apply(r, h, 0, 0, 128, 8, None, RoutingLaunch())
    idx_f, sel_f = SelectedScoresTriton.apply(r, h, 0, 0, 128, 8, None,
                                              RoutingLaunch(precision="ieee"))
    same = idx == idx_f
    assert same.float().mean() >= 0.999, same.float().mean()
    ok = same & (idx >= 0)
    assert_rel_close(sel[ok], sel_f[ok], 1e-5, "selected scores")


def test_grouped_readout_with_16bit_products(poison_empty, kernel_device):
    """The "lowp" products (F cast to the 16-bit input dtype, bf16 × bf16 on a GPU by default)
    forced for fp16 so that the interpreter runs them: forward and every gradient against the
    float64 readout within the 16-bit tolerance, and not the float32-F path's result."""
    q, F, idx, p, _ = readout_inputs(kernel_device, fp16)
    do = torch.randn(*q.shape[:3], F.shape[-1], dtype=f64, device=kernel_device)

    def call(launch):
        return lambda q_, F_, p_: routed_readout_triton(q_, F_, idx, p_, launch)
    o32, _ = grads_of(call(ReadoutLaunch(products="float32")), [q, F, p], do)
    low = ReadoutLaunch(products="16bit")
    assert grouped.use_lowp(low, fp16) and not grouped.use_lowp(low, fp32)
    assert not grouped.use_lowp(ReadoutLaunch(), fp16) and grouped.use_lowp(ReadoutLaunch(),
                                                                             torch.bfloat16)
    o, g = grads_of(call(low), [q, F, p], do)
    o_r, g_r = grads_of(lambda q_, F_, p_: dense_readout(q_, F_, idx.long(), p_),
                        [t.double() for t in (q, F, p)], do)
    assert not torch.equal(o, o32)                  # the 16-bit products did run
    assert_rel_close(o, o_r, TOL[fp16], "long")
    g_r = list(g_r)
    g_r[2] = torch.where(idx >= 0, g_r[2], 0.0)
    for name, a, b in zip(("dq", "dF", "dp"), g, g_r):
        assert a.dtype == {"dq": fp16, "dF": fp32, "dp": fp32}[name]
        assert_rel_close(a, b, TOL[fp16], name)


@pytest.mark.parametrize("dtype,C,top_k,offset,n", [
    (fp32, 8, 2, 0, 0), (fp32, 8, None, 5, 3), (fp32, 6, 1, 4, 2), (fp16, 8, 2, 3, 2)])
def test_bsbr_attention_triton(poison_empty, kernel_device, dtype, C, top_k, offset, n):
    B, H, Tq, K, V, M = 2, 2, 29 - offset, 12, 20, 5
    Tk = Tq + offset
    dev = kernel_device
    x = dict(q=torch.randn(B, H, Tq, K, device=dev), k=torch.randn(B, H, Tk, K, device=dev),
             v=torch.randn(B, H, Tk, V, device=dev), r=torch.randn(B, H, Tq, M, device=dev),
             hk=torch.randn(B, H, Tk, M, device=dev))
    x = {name: t.to(dtype) for name, t in x.items()}
    if n:
        x["bank_F"] = torch.randn(B, H, n, K, V, device=dev)
        x["bank_h"] = torch.randn(B, H, n, M, device=dev).to(dtype)
    names = list(x)
    do = torch.randn(B, H, Tq, V, dtype=f64, device=dev)
    kw = dict(chunk_size=C, top_k=top_k, offset=offset)

    def call(fn, **extra):
        return lambda *a: fn(**dict(zip(names, a)), **kw, **extra)

    o, g = grads_of(call(bsbr_attention, backend="triton"), list(x.values()), do)
    o_r, g_r = grads_of(call(bsbr_attention_ref), [t.double() for t in x.values()], do)
    assert o.dtype == dtype
    assert_rel_close(o, o_r, TOL[dtype], "o")
    for name, a, b in zip(names, g, g_r):
        assert_rel_close(a, b, TOL[dtype], "d" + name)
    _, w = bsbr_attention(**x, **kw, backend="triton", return_slot_weights=True)
    _, w_r = bsbr_attention_ref(**{k_: t.double() for k_, t in x.items()}, **kw,
                                return_slot_weights=True)
    assert w.shape == (B, H, n)
    if n:
        assert_rel_close(w, w_r, TOL[dtype], "slot_weights")


@pytest.mark.parametrize("dtype,products", [(fp32, "auto"), (fp16, "16bit")])
def test_gpu_default_launch_under_the_interpreter(poison_empty, kernel_device, dtype, products):
    """bsbr_attention at the GPU's default launch of every stage, given through launch= (local
    and state tiles of 64, routing 64×32 on tf32x3, readout blocks of 64 entries, dF dots of
    64), at shapes that keep those tiles whole (C = 64, K = V = 64): float32 with its two-pass
    backward, and float16 with 16-bit products and the one-pass backward (the path bfloat16
    takes on a GPU), against the float64 reference."""
    launch = BSBRLaunch(RoutingLaunch(), ReadoutLaunch(products=products), LocalLaunch(),
                        StatesLaunch())
    B, H, T, D, M, C = 1, 2, 200, 64, 16, 64
    x = [(torch.randn(B, H, T, d, device=kernel_device) * 0.5).to(dtype)
         for d in (D, D, D, M, M)]
    do = torch.randn(B, H, T, D, dtype=f64, device=kernel_device)
    kw = dict(chunk_size=C, top_k=2)
    o, g = grads_of(lambda *a: bsbr_attention(*a, **kw, backend="triton", launch=launch), x, do)
    o_r, g_r = grads_of(lambda *a: bsbr_attention_ref(*a, **kw), [t.double() for t in x], do)
    assert o.dtype == dtype
    for name, a, b in zip(("o", "dq", "dk", "dv", "dr", "dhk"), (o, *g), (o_r, *g_r)):
        assert_rel_close(a, b, TOL[dtype], name)


# ------------------------------------------------------------------------------------------
# GPU (bf16 and realistic tiles); skipped without CUDA.
# ------------------------------------------------------------------------------------------
def gpu_inputs(dtype, B, H, Tq, offset, K, V, M, n):
    dev = torch.device("cuda")
    Tk = Tq + offset
    x = dict(q=torch.randn(B, H, Tq, K, device=dev), k=torch.randn(B, H, Tk, K, device=dev),
             v=torch.randn(B, H, Tk, V, device=dev), r=torch.randn(B, H, Tq, M, device=dev),
             hk=torch.randn(B, H, Tk, M, device=dev))
    x = {name: (t * 0.5).to(dtype) for name, t in x.items()}
    if n:
        x["bank_F"] = torch.randn(B, H, n, K, V, device=dev)
        x["bank_h"] = torch.randn(B, H, n, M, device=dev).to(dtype)
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("C,top_k,offset,n,T", [(64, 4, 0, 0, 1000), (256, 8, 100, 5, 1500),
                                                (100, None, 7, 2, 700)])
@pytest.mark.parametrize("mode", ["grouped", "tile"])
def test_bsbr_attention_gpu(mode, dtype, C, top_k, offset, n, T):
    """Triton path vs the torch backend on float32 copies of the same inputs. Both route in
    float32 from the same values, so they pick the same slots (a float64 oracle could break a
    near-tie of top-k scores differently); the torch backend itself is checked against the
    float64 reference on the CPU."""
    x = gpu_inputs(dtype, 1, 3, T, offset, 128, 96, 64, n)
    names = list(x)
    do = torch.randn(1, 3, T, 96, dtype=f64, device="cuda")
    kw = dict(chunk_size=C, top_k=top_k, offset=offset)
    launch = BSBRLaunch(readout=ReadoutLaunch(mode=mode))
    o, g = grads_of(lambda *a: bsbr_attention(**dict(zip(names, a)), **kw, backend="triton",
                                              launch=launch), list(x.values()), do)
    o_r, g_r = grads_of(lambda *a: bsbr_attention(**dict(zip(names, a)), **kw, backend="torch"),
                        [t.float() for t in x.values()], do)
    assert o.dtype == dtype
    assert_rel_close(o, o_r, GPU_TOL[dtype], "o")
    for name, a, b in zip(names, g, g_r):
        assert_rel_close(a, b, GPU_TOL[dtype], "d" + name)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["grouped", "tile"])
def test_triton_backward_is_deterministic_gpu(mode):
    """Same inputs, two backward passes: bitwise equal gradients (dF is gathered per slot
    through the inverse index, no atomics)."""
    x = gpu_inputs(torch.bfloat16, 2, 4, 2048, 0, 128, 128, 64, 3)
    names = list(x)
    do = torch.randn(2, 4, 2048, 128, dtype=f64, device="cuda")
    call = lambda *a: bsbr_attention(**dict(zip(names, a)), chunk_size=128, top_k=8,  # noqa: E731
                                     backend="triton",
                                     launch=BSBRLaunch(readout=ReadoutLaunch(mode=mode)))
    _, g1 = grads_of(call, list(x.values()), do)
    _, g2 = grads_of(call, list(x.values()), do)
    for name, a, b in zip(names, g1, g2):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,offset,C", [(2048, 0, 256), (999, 37, 256), (1000, 0, 100)])
def test_local_triton_gpu(dtype, T, offset, C):
    """The local kernels at H100-like tiles (D = 128, C = 256) vs chunked SDPA in float32."""
    dev = torch.device("cuda")
    x = [torch.randn(2, 4, n, 128, device=dev).to(dtype) for n in (T, T + offset, T + offset)]
    do = torch.randn(2, 4, T, 128, dtype=f64, device=dev)
    kw = dict(chunk_size=C, offset=offset)
    o, g = grads_of(lambda *a: chunk_local_attention(*a, backend="triton", **kw), x, do)
    o_r, g_r = grads_of(lambda *a: chunk_local_attention(*a, backend="torch", **kw),
                        [t.float() for t in x], do)
    assert_rel_close(o, o_r, GPU_TOL[dtype], "o")
    for name, a, b in zip(("dq", "dk", "dv"), g, g_r):
        assert_rel_close(a, b, GPU_TOL[dtype], name)


@pytest.mark.gpu
def test_long_sequence_gpu_runs_without_quadratic_memory():
    """T = 32k, C = 256, top_k = 8 at H16 D128: forward + backward complete, finite, and the
    peak memory stays far below one T×T fp32 score matrix per head."""
    dev = torch.device("cuda")
    B, H, T, D, C = 1, 16, 32768, 128, 256
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k, v, r, hk = mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D)
    torch.cuda.reset_peak_memory_stats()
    o = bsbr_attention(q, k, v, r, hk, chunk_size=C, top_k=8, backend="triton")
    o.float().square().mean().backward()
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()
    assert torch.cuda.max_memory_allocated() < 0.25 * H * T * T * 4


@pytest.mark.parametrize("dtype,T,C,K,V", [
    (fp32, 37, 8, 12, 20), (fp32, 40, 20, 33, 70), (fp32, 15, 16, 12, 20), (fp16, 37, 8, 12, 20)])
def test_chunk_states_triton(poison_empty, kernel_device, dtype, T, C, K, V):
    """F (float32, from 16-bit inputs too) and h of the complete chunks, and dk, dv, dhk; the
    keys past the last complete chunk get exactly zero gradient through F and h."""
    x = [torch.randn(2, 3, T, d, device=kernel_device).to(dtype) for d in (K, V, 5)]
    nC = T // C
    dF = torch.randn(2, 3, nC, K, V, dtype=f64, device=kernel_device)
    dh = torch.randn(2, 3, nC, 5, dtype=f64, device=kernel_device)

    def run(fn, leaves):
        leaves = [t.detach().clone().requires_grad_() for t in leaves]
        F_, h_ = fn(*leaves, chunk_size=C)
        g = torch.autograd.grad((F_.double() * dF).sum() + (h_.double() * dh).sum(), leaves,
                                allow_unused=True)
        return F_, h_, [torch.zeros_like(t) if gi is None else gi for t, gi in zip(leaves, g)]

    if nC == 0:
        F, h = chunk_states(*x, chunk_size=C, backend="triton")
        assert F.shape == (2, 3, 0, K, V) and h.shape == (2, 3, 0, 5)
        return
    F, h, g = run(lambda *a, **kw: chunk_states(*a, **kw, backend="triton"), x)
    F_r, h_r, g_r = run(chunk_states_ref, [t.double() for t in x])
    assert F.dtype == torch.float32 and h.dtype == torch.float32
    assert_rel_close(F, F_r, TOL[dtype], "F")
    assert_rel_close(h, h_r, TOL[dtype], "h")
    for name, a, b in zip(("dk", "dv", "dhk"), g, g_r):
        assert_rel_close(a, b, TOL[dtype], name)
        assert not a[:, :, nC * C:].any()

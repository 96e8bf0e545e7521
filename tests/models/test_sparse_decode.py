"""The sparse decoding step: device-side compaction of the active neurons, the
sparse Hebbian readout + update, the sparse decoder product, and a whole BDH decoding step
through them, against float64 dense references and the model's dense step."""
import pytest
import torch

from bdh import BDH, BDHConfig, BDHState
from bdh.sparse_decode import SparseDecodeLaunch, sparse_decode_step
from helpers import assert_rel_close
from kernels import hebbian_step
from kernels.hebbian.sparse_naive import (active_rows_naive, sparse_hebbian_step_naive,
                                          sparse_rows_matmul_naive)
from kernels.hebbian.sparse_step import compact_nonzero, sparse_hebbian_step, sparse_rows_matmul

PATTERNS = ["random", "all_zero", "all_active", "mixed"]


def sparse_like(shape, pattern, density=0.2, device="cpu"):
    """Random signed values, zeroed by ``pattern``: "random" keeps ~density of the entries,
    "all_zero" / "all_active" everything / nothing, "mixed" makes the first row (over the
    leading dims) all zero, the second all active and the rest random."""
    x = torch.randn(shape, device=device)
    if pattern == "all_active":
        return x + torch.where(x >= 0, 0.1, -0.1)               # no exact zeros
    if pattern == "all_zero":
        return torch.zeros(shape, device=device)
    keep = torch.rand(shape, device=device) < density
    if pattern == "mixed":
        flat = keep.view(-1, shape[-1])
        flat[0] = False
        if flat.shape[0] > 1:
            flat[1] = True
    return x * keep


def dense_step64(q, k, v, S, scale, strict):
    """The dense step in float64: o = scale·q S (strict, before the update) then S + kᵀ v."""
    q, k, v, S = q.double(), k.double(), v.double(), S.double()
    Snew = S + k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, S if strict else Snew)
    return o, Snew


# ----------------------------------------------------------------------------- compaction

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("R,L", [(1, 70), (6, 130), (2, 5000)])
def test_compact_nonzero_lists_the_nonzeros_in_order(kernel_device, pattern, R, L):
    x = sparse_like((R, L), pattern, device=kernel_device)
    idx, count = compact_nonzero(x)
    assert idx.dtype == count.dtype == torch.int32 and list(idx.shape) == [R, L]
    for r, rows in enumerate(active_rows_naive(x)):
        assert int(count[r]) == rows.numel()
        assert torch.equal(idx[r, :int(count[r])].long().cpu(), rows.cpu())


def test_compact_nonzero_union_and_given_buffers(kernel_device):
    x = sparse_like((4, 90), "mixed", device=kernel_device)
    y = sparse_like((4, 90), "random", device=kernel_device)
    idx = torch.full((4, 90), -7, dtype=torch.int32, device=kernel_device)
    count = torch.full((4,), -7, dtype=torch.int32, device=kernel_device)
    out_idx, out_count = compact_nonzero(x, y, idx=idx, count=count)
    assert out_idx is idx and out_count is count                    # filled in place
    for r, rows in enumerate(active_rows_naive(x, y)):
        n = int(count[r])
        assert n == rows.numel() and torch.equal(idx[r, :n].long().cpu(), rows.cpu())
        assert (idx[r, n:] == -7).all()                              # past count: untouched


# ----------------------------------------------------------------------------- Hebbian step

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("B,H,K,V,HV", [(1, 2, 70, 24, 1), (3, 2, 130, 40, 2)])
def test_sparse_step_equals_dense_step(kernel_device, poison_empty, pattern, B, H, K, V, HV):
    dev = kernel_device
    q = sparse_like((B, H, K), pattern, device=dev)
    v = torch.randn(B, HV, V, device=dev)
    S0 = torch.randn(B, H, K, V, device=dev)
    S = S0.clone()
    o, S_out = sparse_hebbian_step(q, q, v, S, backend="triton")
    assert S_out is S and o.dtype == v.dtype and list(o.shape) == [B, H, V]
    o_ref, S_ref = dense_step64(q, q, v, S0, 1.0, True)
    if pattern == "all_zero":
        assert torch.equal(o, torch.zeros_like(o)) and torch.equal(S, S0)
        return
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(S, S_ref, 1e-6, "state")
    inactive = (q == 0)[..., None].expand_as(S)
    assert torch.equal(S[inactive], S0[inactive])                   # bit-for-bit untouched
    # and the package's dense step (float32) agrees
    o_d, S_d = hebbian_step(q, q, v, S0.clone(), backend="torch")
    assert_rel_close(o, o_d, 1e-5, "o vs hebbian_step")
    assert_rel_close(S, S_d, 1e-6, "state vs hebbian_step")


@pytest.mark.parametrize("strict", [True, False])
def test_sparse_step_q_differs_from_k_inclusive_and_scale(kernel_device, strict):
    """General q ≠ k: the active set is the union; rows with k_r = 0 but q_r ≠ 0 are read,
    not written."""
    dev = kernel_device
    B, H, K, V = 3, 2, 90, 33
    q = sparse_like((B, H, K), "mixed", device=dev)
    k = sparse_like((B, H, K), "random", device=dev)
    v = torch.randn(B, H, V, device=dev)
    S0 = torch.randn(B, H, K, V, device=dev)
    S = S0.clone()
    o, _ = sparse_hebbian_step(q, k, v, S, scale=0.37, strict=strict, backend="triton")
    o_ref, S_ref = dense_step64(q, k, v, S0, 0.37, strict)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(S, S_ref, 1e-6, "state")
    no_k = (k == 0)[..., None].expand_as(S)
    assert torch.equal(S[no_k], S0[no_k])


@pytest.mark.parametrize("strict", [True, False])
def test_naive_reference_equals_dense(strict):
    B, H, K, V = 3, 2, 70, 24
    q = sparse_like((B, H, K), "mixed")
    k = sparse_like((B, H, K), "random")
    v = torch.randn(B, 1, V)
    S0 = torch.randn(B, H, K, V)
    S = S0.clone()
    o, _ = sparse_hebbian_step_naive(q, k, v, S, scale=1.5, strict=strict)
    o_ref, S_ref = dense_step64(q, k, v, S0, 1.5, strict)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(S, S_ref, 1e-6, "state")
    o2, _ = sparse_hebbian_step(q, k, v, S0.clone(), scale=1.5, strict=strict, backend="torch")
    assert torch.equal(o2, o)


def test_sparse_step_with_given_and_superset_indices(kernel_device):
    """Precomputed active rows are used as given; a superset (every row) gives the same result."""
    dev = kernel_device
    B, H, K, V = 3, 2, 70, 24
    q = sparse_like((B, H, K), "random", device=dev)
    v = torch.randn(B, 1, V, device=dev)
    S0 = torch.randn(B, H, K, V, device=dev)
    idx, count = compact_nonzero(q.view(B * H, K))
    S1, S2 = S0.clone(), S0.clone()
    o1, _ = sparse_hebbian_step(q, q, v, S1, backend="triton", idx=idx, count=count)
    every = torch.arange(K, dtype=torch.int32, device=dev).repeat(B * H, 1).contiguous()
    full = torch.full((B * H,), K, dtype=torch.int32, device=dev)
    o2, _ = sparse_hebbian_step(q, q, v, S2, backend="triton", idx=every, count=full)
    o_ref, S_ref = dense_step64(q, q, v, S0, 1.0, True)
    assert_rel_close(o1, o_ref, 1e-5, "o (given indices)")
    assert_rel_close(o2, o_ref, 1e-5, "o (every row)")
    assert_rel_close(S1, S_ref, 1e-6, "state")
    assert_rel_close(S2, S_ref, 1e-6, "state (every row)")


def test_sparse_step_float16_noncontiguous_and_batch_64(kernel_device):
    """fp16 inputs (o in fp16, the state float32), a non-contiguous q = k view, and B = 64
    (one index buffer per batch row and head)."""
    dev = kernel_device
    B, H, K, V = 64, 2, 34, 24
    q = sparse_like((B, K, H), "mixed", device=dev).transpose(1, 2)      # [B,H,K], a view
    assert not q.is_contiguous()
    v = torch.randn(B, 1, V, device=dev)
    S0 = torch.randn(B, H, K, V, device=dev)
    S = S0.clone()
    o, _ = sparse_hebbian_step(q, q, v, S, backend="triton")
    o_ref, S_ref = dense_step64(q, q, v, S0, 1.0, True)
    assert_rel_close(o, o_ref, 1e-5, "o (B = 64)")
    assert_rel_close(S, S_ref, 1e-6, "state (B = 64)")
    qh, vh = q[:3].half(), v[:3].half()
    S = S0[:3].clone()
    o, _ = sparse_hebbian_step(qh, qh, vh, S, backend="triton")
    assert o.dtype == torch.float16
    o_ref, S_ref = dense_step64(qh, qh, vh, S0[:3], 1.0, True)
    assert_rel_close(o, o_ref, 2e-3, "o fp16")
    assert_rel_close(S, S_ref, 1e-6, "state (fp16 inputs)")


def test_sparse_step_is_deterministic(kernel_device):
    B, H, K, V = 1, 2, 130, 24
    q = sparse_like((B, H, K), "random", density=0.5, device=kernel_device)
    v = torch.randn(B, 1, V, device=kernel_device)
    S0 = torch.randn(B, H, K, V, device=kernel_device)
    outs = [sparse_hebbian_step(q, q, v, S0.clone(), backend="triton") for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ----------------------------------------------------------------------------- decoder product

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("R,L,D", [(1, 90, 24), (3, 200, 40)])
def test_sparse_rows_matmul_equals_dense(kernel_device, poison_empty, pattern, R, L, D):
    x = sparse_like((R, L), pattern, density=0.05, device=kernel_device)
    W = torch.randn(L, D, device=kernel_device)
    y = sparse_rows_matmul(x, W, backend="triton")
    assert y.dtype == x.dtype and list(y.shape) == [R, D]
    if pattern == "all_zero":
        assert torch.equal(y, torch.zeros_like(y))
    else:
        assert_rel_close(y, x.double() @ W.double(), 1e-5, "y")
    assert_rel_close(sparse_rows_matmul_naive(x, W), x.double() @ W.double(), 1e-5, "naive")


def test_sparse_rows_matmul_float16(kernel_device):
    x = sparse_like((3, 130), "random", device=kernel_device).half()
    W = (0.1 * torch.randn(130, 33, device=kernel_device)).half()
    y = sparse_rows_matmul(x, W, backend="triton")
    assert y.dtype == torch.float16
    assert_rel_close(y, x.double() @ W.double(), 2e-3, "y fp16")


# ----------------------------------------------------------------------------- BDH step

def tiny_bdh(backend, device="cpu"):
    cfg = BDHConfig(n_layer=2, n_embd=24, n_head=2, mlp_internal_dim_multiplier=10,
                    vocab_size=37, dropout=0.1, backend=backend)      # N = 120 per head
    model = BDH(cfg).to(device).eval()
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder, model.lm_head):
            p.mul_(10)                   # unit-scale activations: logits that differ visibly
    return model


def dense_step(model, tok, states, position):
    """The model's dense decoding step (its forward on one token from a state, no autograd):
    ``states`` (a list) becomes the stepped state; returns the logits [B,1,vocab]."""
    with torch.no_grad():
        logits, st = model(tok, state=BDHState(states, position, model.state_config()),
                           return_state=True)
    states[:] = st.layers
    return logits


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("backend,sparse_backend", [("torch", "triton"), ("triton", "triton"),
                                                    ("torch", "torch")])
def test_bdh_sparse_step_equals_dense_step(kernel_device, B, backend, sparse_backend):
    model = tiny_bdh(backend, kernel_device)
    idx = torch.randint(0, 37, (B, 6), device=kernel_device)
    with torch.no_grad():
        _, st = model(idx, return_state=True)
        dense = [S.clone() for S in st.layers]
        sparse = [S.clone() for S in st.layers]
        pos = st.position
        for _ in range(2):                               # two steps: the states stay equal
            tok = torch.randint(0, 37, (B, 1), device=kernel_device)
            ref = dense_step(model, tok, dense, pos)
            out, states = sparse_decode_step(model, tok, sparse, pos, backend=sparse_backend)
            assert states is sparse
            assert_rel_close(out, ref, 1e-5, "logits")
            for a, b in zip(sparse, dense):
                assert_rel_close(a, b, 1e-6, "state")
            pos += 1
    assert (sparse[0] - st.layers[0]).abs().max() > 0               # the step did update it


def fused_bdh(device, dtype=torch.float32):
    """N = 128 per head (a power-of-two factor >= 16): the fused layer runs."""
    cfg = BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8,
                    vocab_size=37, dropout=0.0, backend="torch")
    model = BDH(cfg).to(device).eval()
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder, model.lm_head):
            p.mul_(10)
    return model.to(dtype)


@pytest.mark.parametrize("B,dtype,tol", [(1, torch.float32, 1e-5), (3, torch.float32, 1e-5),
                                         (17, torch.float32, 1e-5), (2, torch.float16, 2e-2)])
def test_fused_sparse_layer_equals_unfused_and_dense(kernel_device, monkeypatch, B, dtype, tol):
    """The fused kernels (kernels.hebbian.decode_fused: 8 launches a layer) against the unfused
    sparse step and the dense step, two steps in a row at a device-held position; B = 17
    crosses the encoders' 16-row blocks."""
    import bdh.sparse_decode as sd
    from kernels.hebbian import decode_fused
    model = fused_bdh(kernel_device, dtype)
    assert sd._fused_ok(model, "triton", dtype)
    calls = []
    real = decode_fused.encode_rope
    monkeypatch.setattr(decode_fused, "encode_rope", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    idx = torch.randint(0, 37, (B, 6), device=kernel_device)
    with torch.no_grad():
        _, st = model(idx, return_state=True)
        runs = {name: [S.clone() for S in st.layers] for name in ("dense", "unfused", "fused")}
        for step in range(2):
            tok = torch.randint(0, 37, (B, 1), device=kernel_device)
            pos = st.position + step
            ref = dense_step(model, tok, runs["dense"], pos)
            n = len(calls)
            unf, _ = sparse_decode_step(model, tok, runs["unfused"], pos, backend="triton",
                                        launch=SparseDecodeLaunch(fused=False))
            assert len(calls) == n                           # the unfused kernels ran
            out, _ = sparse_decode_step(model, tok, runs["fused"],
                                        torch.tensor([pos], device=kernel_device),
                                        backend="triton", launch=SparseDecodeLaunch())
            assert len(calls) == n + 2                       # the fused path ran, per layer
            assert out.dtype == dtype and out.shape == (B, 1, 37)
            assert_rel_close(out, unf, tol, "logits vs unfused")
            assert_rel_close(out, ref, tol, "logits vs dense")
            for a, b in zip(runs["fused"], runs["dense"]):
                assert_rel_close(a, b, tol / 10 if dtype == torch.float32 else tol, "state")


@pytest.mark.parametrize("fused", [True, False])
def test_sparse_decode_launch_reaches_every_kernel(kernel_device, monkeypatch, fused):
    """Each launch of a SparseDecodeLaunch is handed to its kernel (a spy on each launcher);
    other tiles change how the kernels run, not what they compute."""
    from kernels.hebbian import decode_fused, sparse_step
    from kernels.hebbian.launches import (CompactLaunch, EncodeGateLaunch, EncodeRopeLaunch,
                                          ReduceLaunch, SparseStepLaunch)
    launch = SparseDecodeLaunch(fused=fused, step=SparseStepLaunch(BK=16, BV=16, splits=3),
                                rows=SparseStepLaunch(BK=32, BV=16, warps=2),
                                compact=CompactLaunch(warps=2),
                                encode_rope=EncodeRopeLaunch(BP=16, BB=16, BD=16),
                                encode_gate=EncodeGateLaunch(BN=32, BD=16),
                                reduce=ReduceLaunch(BC=16))
    seen = {}
    spied = [(decode_fused, "encode_rope", "encode_rope"),
             (decode_fused, "encode_gate", "encode_gate"),
             (decode_fused, "reduce_layernorm", "reduce"),
             (sparse_step, "sparse_step_partials", "step"),
             (sparse_step, "sparse_rows_partials", "rows"),
             (sparse_step, "sparse_hebbian_step", "step"),
             (sparse_step, "sparse_rows_matmul", "rows")]
    for module, name, field in spied:
        real = getattr(module, name)

        def spy(*a, _real=real, _field=field, **k):
            seen.setdefault(_field, set()).add(k.get("launch"))
            return _real(*a, **k)
        monkeypatch.setattr(module, name, spy)
    import bdh.sparse_decode as sd
    monkeypatch.setattr(sd, "sparse_hebbian_step", sparse_step.sparse_hebbian_step)
    monkeypatch.setattr(sd, "sparse_rows_matmul", sparse_step.sparse_rows_matmul)
    model = fused_bdh(kernel_device)
    with torch.no_grad():
        _, st = model(torch.randint(0, 37, (3, 5), device=kernel_device), return_state=True)
    tok = torch.randint(0, 37, (3, 1), device=kernel_device)
    ref = dense_step(model, tok, [S.clone() for S in st.layers], st.position)
    out, _ = sparse_decode_step(model, tok, [S.clone() for S in st.layers], st.position,
                                backend="triton", launch=launch)
    assert_rel_close(out, ref, 1e-5, "logits")
    want = (["encode_rope", "encode_gate", "reduce", "step", "rows"] if fused
            else ["step", "rows"])
    assert sorted(seen) == sorted(want)
    for field in want:
        assert seen[field] == {getattr(launch, field)}, field
    with pytest.raises(TypeError, match="SparseDecodeLaunch.step"):
        SparseDecodeLaunch(step=CompactLaunch())
    with pytest.raises(TypeError, match="SparseDecodeLaunch.fused"):
        SparseDecodeLaunch(fused=1)
    with pytest.raises(TypeError, match="launch"):
        sparse_decode_step(model, tok, st.layers, st.position, launch={"fused": False})


def test_fused_layer_needs_a_tileable_N(kernel_device):
    import bdh.sparse_decode as sd
    assert not sd._fused_ok(tiny_bdh("torch", kernel_device), "triton", torch.float32)  # N=120
    assert not sd._fused_ok(fused_bdh(kernel_device), "torch", torch.float32)


def test_bdh_sparse_step_device_position_and_forward_state(kernel_device):
    """A device-held position (as the captured decoder passes it) and the model's public step
    agree."""
    model = tiny_bdh("torch", kernel_device)
    idx = torch.randint(0, 37, (3, 5), device=kernel_device)
    tok = torch.randint(0, 37, (3, 1), device=kernel_device)
    with torch.no_grad():
        _, st = model(idx, return_state=True)
        ref, st_ref = model(tok, state=st, return_state=True)
        states = [S.clone() for S in st.layers]
        pos = torch.tensor([st.position], device=kernel_device)
        out, _ = sparse_decode_step(model, tok, states, pos, backend="triton")
    assert_rel_close(out, ref, 1e-5, "logits")
    for a, b in zip(states, st_ref.layers):
        assert_rel_close(a, b, 1e-6, "state")


# ----------------------------------------------------------------------------- errors

def test_sparse_step_rejects_bad_inputs():
    B, H, K, V = 1, 2, 70, 24
    q, v = torch.randn(B, H, K), torch.randn(B, 1, V)
    S = torch.randn(B, H, K, V)
    with pytest.raises(TypeError, match="q"):
        sparse_hebbian_step(q.long(), q.long(), v, S)
    with pytest.raises(TypeError, match="state"):
        sparse_hebbian_step(q, q, v, S.double())
    with pytest.raises(ValueError, match="v"):
        sparse_hebbian_step(q, q, torch.randn(B, 3, V), S)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_hebbian_step(q, q, v, S.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="backend"):
        sparse_hebbian_step(q, q, v, S, backend="cuda")
    idx = torch.zeros(B * H, K, dtype=torch.int32)
    count = torch.zeros(B * H, dtype=torch.int32)
    with pytest.raises(ValueError, match="idx, count"):
        sparse_hebbian_step(q, q, v, S, idx=idx)
    with pytest.raises(TypeError, match="idx"):
        sparse_hebbian_step(q, q, v, S, idx=idx.long(), count=count)
    with pytest.raises(ValueError, match="count"):
        sparse_hebbian_step(q, q, v, S, idx=idx, count=count[:1])
    with pytest.raises(ValueError, match="not differentiable"):
        sparse_hebbian_step(q.requires_grad_(), q, v, S)


def test_rows_matmul_and_compaction_reject_bad_inputs():
    x, W = torch.randn(3, 90), torch.randn(90, 24)
    with pytest.raises(ValueError, match="weight"):
        sparse_rows_matmul(x, torch.randn(80, 24))
    with pytest.raises(TypeError, match="x"):
        sparse_rows_matmul(x.int(), W)
    with pytest.raises(ValueError, match="x"):
        sparse_rows_matmul(torch.randn(3, 4, 90), W)
    with pytest.raises(ValueError, match="not differentiable"):
        sparse_rows_matmul(x, W.requires_grad_())
    with pytest.raises(ValueError, match="y"):
        compact_nonzero(x, torch.randn(3, 91))
    with pytest.raises(ValueError, match="x"):
        compact_nonzero(torch.randn(0, 5))


def test_sparse_decode_step_rejects_bad_inputs():
    model = tiny_bdh("torch")
    states = model.init_state(2).layers
    tok = torch.randint(0, 37, (2, 1))
    with pytest.raises(TypeError, match="model"):
        sparse_decode_step(object(), tok, states, 0)
    with pytest.raises(ValueError, match="idx"):
        sparse_decode_step(model, torch.randint(0, 37, (2, 2)), states, 0)
    with pytest.raises(ValueError, match="states"):
        sparse_decode_step(model, tok, states[:1], 0)
    with pytest.raises(ValueError, match=r"states\[0\]"):
        sparse_decode_step(model, torch.randint(0, 37, (3, 1)), states, 0)
    with pytest.raises(ValueError, match="position"):
        sparse_decode_step(model, tok, states, -1)
    with pytest.raises(ValueError, match="backend"):
        sparse_decode_step(model, tok, states, 0, backend="dense")
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        sparse_decode_step(model, tok, states, 0)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
def test_gpu_sparse_step_at_bdh_shape_and_in_a_cuda_graph():
    """The BDH state shape (B2 H4 K8192 V256) at 20% density, eager and replayed from a CUDA
    graph with new inputs copied into the captured buffers."""
    dev = torch.device("cuda")
    B, H, K, V = 2, 4, 8192, 256
    q = sparse_like((B, H, K), "mixed", device=dev)
    v = torch.randn(B, 1, V, device=dev)
    S0 = torch.randn(B, H, K, V, device=dev)
    S = S0.clone()
    o, _ = sparse_hebbian_step(q, q, v, S, backend="triton")
    o_ref, S_ref = dense_step64(q, q, v, S0, 1.0, True)
    assert_rel_close(o, o_ref, 1e-5, "o")
    assert_rel_close(S, S_ref, 1e-6, "state")
    # capture, then replay on a new sparsity pattern
    q_buf, v_buf, S_buf = q.clone(), v.clone(), S0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sparse_hebbian_step(q_buf, q_buf, v_buf, S_buf.clone(), backend="triton")   # warm-up
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o_buf, _ = sparse_hebbian_step(q_buf, q_buf, v_buf, S_buf, backend="triton")
    q2 = sparse_like((B, H, K), "random", density=0.05, device=dev)
    v2 = torch.randn(B, 1, V, device=dev)
    q_buf.copy_(q2), v_buf.copy_(v2), S_buf.copy_(S0)
    g.replay()
    torch.cuda.synchronize()
    o2_ref, S2_ref = dense_step64(q2, q2, v2, S0, 1.0, True)
    assert_rel_close(o_buf, o2_ref, 1e-5, "o (graph replay)")
    assert_rel_close(S_buf, S2_ref, 1e-6, "state (graph replay)")
    x = sparse_like((B, 4 * K), "random", density=0.02, device=dev)
    W = torch.randn(4 * K, V, device=dev)
    assert_rel_close(sparse_rows_matmul(x, W, backend="triton"), x.double() @ W.double(), 1e-5,
                     "decoder product")


@pytest.mark.gpu
def test_gpu_bdh_sparse_step_captured_in_a_cuda_graph():
    """sparse_decode_step captured once (device-held position, as the captured decoder does)
    and replayed for three tokens equals the dense eager step."""
    dev = torch.device("cuda")
    model = tiny_bdh("triton", dev)
    B = 3
    with torch.no_grad():
        _, st = model(torch.randint(0, 37, (B, 6), device=dev), return_state=True)
    dense = [S.clone() for S in st.layers]
    sparse = [S.clone() for S in st.layers]
    tok = torch.randint(0, 37, (B, 1), device=dev)
    pos = torch.tensor([st.position], dtype=torch.int64, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sparse_decode_step(model, tok, [S.clone() for S in sparse], pos.clone())     # warm-up
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = sparse_decode_step(model, tok, sparse, pos)
    p = st.position
    for _ in range(3):
        nxt = torch.randint(0, 37, (B, 1), device=dev)
        tok.copy_(nxt)
        g.replay()
        pos.add_(1)
        with torch.no_grad():
            ref = dense_step(model, nxt, dense, p)
        p += 1
        torch.cuda.synchronize()
        assert_rel_close(out, ref, 1e-4, "logits (graph replay)")
        for a, b in zip(sparse, dense):
            assert_rel_close(a, b, 1e-5, "state (graph replay)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gpu_fused_sparse_decode_in_generate(dtype, tol):
    """generate(sparse=True) with its CUDA graph runs the fused layer (N = 128); its logits
    path equals the dense graph's tokens on a float32 model and stays close in bf16."""
    import bdh.sparse_decode as sd
    model = fused_bdh("cuda", dtype)
    assert sd._fused_ok(model, "triton", dtype)
    prompt = torch.randint(0, 37, (3, 20), device="cuda")
    with torch.no_grad():
        _, st = model.generate(prompt, 0, return_state=True)
        tok = prompt[:, -1:]
        a = [S.clone() for S in st.layers]
        b = [S.clone() for S in st.layers]
        out, _ = sparse_decode_step(model, tok, a, st.position)
        ref = dense_step(model, tok, b, st.position)
    assert_rel_close(out, ref, tol, "logits")
    dense = model.generate(prompt, 12, top_k=1, cuda_graph=True)
    sparse = model.generate(prompt, 12, top_k=1, cuda_graph=True, sparse=True)
    if dtype == torch.float32:
        assert torch.equal(dense, sparse)


@pytest.mark.parametrize("NS,V,with_res", [(37, 20, False), (37, 20, True), (1, 256, True),
                                           (70, 256, False)])
def test_reduce_layernorm_sums_every_partial(kernel_device, NS, V, with_res):
    """The fused reduce + LayerNorm loads BS partials per step: NS not a multiple of BS, one
    partial, and wide rows; against sum → round → LN (→ + res → round → LN) in PyTorch."""
    from kernels.hebbian.decode_fused import reduce_layernorm
    part = torch.randn(3, NS, V, device=kernel_device)
    res = torch.randn(3, V, device=kernel_device) if with_res else None
    out = reduce_layernorm(part, torch.float32, 1e-5, res=res)
    ln = lambda t: torch.nn.functional.layer_norm(t, (V,), eps=1e-5)   # noqa: E731
    ref = ln(part.double().sum(1)).float()
    if with_res:
        ref = ln(res + ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _ln64(t):
    """LayerNorm without affine in float64 (eps 1e-5)."""
    return torch.nn.functional.layer_norm(t.double(), (t.shape[-1],), eps=1e-5)


def _reduce_ln_reference(part, out_dtype, res=None):
    """The kernel's rounding chain in float64: y = Σ part → out dtype → LN → out dtype, and with
    res: LN(res + that) → out dtype."""
    a = _ln64(part.double().sum(1).to(out_dtype)).to(out_dtype)
    if res is not None:
        a = _ln64((res.double() + a.double()).to(out_dtype)).to(out_dtype)
    return a


@pytest.mark.parametrize("NS,V,BC", [(70, 40, 16), (70, 300, 16), (600, 700, 32)])
@pytest.mark.parametrize("with_res", [False, True])
def test_reduce_layernorm_column_blocks_and_counter_reset(kernel_device, poison_empty, NS, V, BC,
                                                          with_res):
    """The column-parallel reduce + LayerNorm (grid (cdiv(V, BC), R), the last program of a row
    normalises it): NS not a multiple of the rows per load (and several loads at NS = 600), V not
    a power of two and spanning 3, 19 or 22 column blocks (the last partial), both column
    widths; against float64. Run twice on different data: the per-row counters must be back at
    0 after each launch, or the second launch never normalises (its output stays NaN)."""
    from kernels.hebbian.decode_fused import _row_counters, reduce_layernorm
    from kernels.hebbian.step import reduce_tiles
    R = 3
    assert reduce_tiles(R, NS, V)[0] == BC          # the case covers the width it names
    for _ in range(2):
        part = torch.randn(R, NS, V, device=kernel_device)
        res = torch.randn(R, V, device=kernel_device) if with_res else None
        out = reduce_layernorm(part, torch.float32, 1e-5, res=res)
        torch.testing.assert_close(out, _reduce_ln_reference(part, torch.float32, res),
                                   rtol=1e-5, atol=1e-5)
        assert not _row_counters(R, kernel_device)[:R].any()


@pytest.mark.parametrize("with_res", [False, True])
def test_reduce_layernorm_rounds_to_float16_where_the_modules_do(kernel_device, with_res):
    """float16 output: Σ part is rounded to float16 before the first LayerNorm and after it, and
    res + LN(y) again before the second (the module's rounding points). The partials are
    multiples of 1/64 around 1000, so the float32 sum is exact in any order and its float16
    rounding (steps of 0.5 there) moves the LayerNorm visibly; res around 100 makes the
    rounding of res + LN(y) (steps of 1/16) matter as much."""
    from kernels.hebbian.decode_fused import reduce_layernorm
    part = torch.randint(-64, 65, (4, 66, 256), device=kernel_device).float() / 64
    part[:, 0] += 1000
    res = (100 + torch.randn(4, 256, device=kernel_device)).half() if with_res else None
    out = reduce_layernorm(part, torch.float16, 1e-5, res=res)
    assert out.dtype == torch.float16
    ref = _reduce_ln_reference(part, torch.float16, res)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("R,NS,V,dtype", [(3, 70, 40, torch.float32), (3, 300, 40, torch.float32),
                                          (4, 66, 256, torch.float16), (1, 530, 100,
                                                                         torch.float32)])
def test_plain_reduce_sums_every_partial(kernel_device, poison_empty, R, NS, V, dtype):
    """step.reduce_partials on narrow column blocks: NS not a multiple of the rows per load (one
    masked load at 70, several at 300 and 530), V not a multiple of the block; every column of
    every row written (empty buffers are NaN here), cast to out's dtype."""
    from kernels.hebbian.step import reduce_partials
    part = torch.randn(R, NS, V, device=kernel_device)
    out = reduce_partials(part, torch.empty(R, V, dtype=dtype, device=kernel_device))
    ref = part.double().sum(1).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * NS ** 0.5)


def test_reduce_tiles_spread_the_batch_1_shapes():
    """At the batch-1 BDH shapes the reduces run many programs with big loads: R = 4, V = 256
    gives 64 programs; every tile stays within 8192 float32 (32 KB), at most 256 rows."""
    from kernels.hebbian.step import reduce_tiles
    assert reduce_tiles(4, 66, 256) == (16, 128)            # 16 × 4 programs, one load each
    assert reduce_tiles(1, 528, 256) == (16, 256)           # 16 programs, 3 loads
    assert reduce_tiles(64, 66, 256) == (32, 128)           # enough rows: full 128-byte lines
    for R, NS, V in [(1, 1, 16), (4, 10_000, 256), (2, 300, 4096)]:
        BV, BS = reduce_tiles(R, NS, V)
        assert BS * BV <= 8192 and 1 <= BS <= 256 and BS & (BS - 1) == 0


def test_eager_sparse_generate_equals_dense_and_advances_the_position(kernel_device):
    """generate(sparse=True) without a CUDA graph (the position lives on the device and is
    advanced in place): the same greedy tokens and the same final state as the dense loop."""
    model = fused_bdh(kernel_device)
    prompt = torch.randint(0, 37, (2, 9), device=kernel_device)
    with torch.no_grad():
        dense, st_d = model.generate(prompt, 6, top_k=1, cuda_graph=False, return_state=True)
        sparse, st_s = model.generate(prompt, 6, top_k=1, cuda_graph=False, sparse=True,
                                      return_state=True)
    assert torch.equal(dense, sparse)
    assert st_s.position == st_d.position == 9 + 5
    for a, b in zip(st_s.layers, st_d.layers):
        assert_rel_close(a, b, 1e-5, "state")

"""Launch settings of the Hebbian decoding kernels (kernels/hebbian/launches.py), and the
compiled variants a prompt selects (no prompt length may be a specialisation key).

Each kernel runs twice against its reference: with the GPU-default launch (the dataclass
defaults; on the CPU the interpreter's own defaults are smaller, so these are the tests that
cover the production tiles there) and with a small, odd launch. A spy on the Triton kernel
checks that the public entry point handed the launch down: the kernel saw its tiles, warps and
splits. The chunked forward/backward and the dense step have the same tests in
test_hebbian_kernels.py. Bad launches are refused before any work.
"""
import pytest
import torch
import triton
from torch.nn.functional import layer_norm

from helpers import assert_rel_close
from kernels import (ChunkLaunch, CompactLaunch, EncodeGateLaunch, EncodeRopeLaunch, ReduceLaunch,
                     SparseStepLaunch, StepLaunch, hebbian_attention, hebbian_step)
from kernels.hebbian import decode_fused, launches, sparse_step, step
from kernels.hebbian.plan import default_chunk_launch
from kernels.hebbian.sparse_naive import (active_rows_naive, sparse_hebbian_step_naive,
                                          sparse_rows_matmul_naive)
from kernels.launch import INTERPRET, length_bucket, pow2_tile, shape_class, store_tuned
from kernels.rope import pair_freqs64, rotate_reference


class KernelSpy:
    """Stands in for a Triton kernel: records (grid, keyword arguments) of every launch, then
    launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, kw))
            return self.kernel[grid](*args, **kw)
        return launch


def spy(monkeypatch, module, name) -> KernelSpy:
    s = KernelSpy(getattr(module, name))
    monkeypatch.setattr(module, name, s)
    return s


def sparse(*shape, density=0.3, device="cpu"):
    """Random signed values with ~density of them non-zero."""
    return torch.randn(shape, device=device) * (torch.rand(shape, device=device) < density)


# ------------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("launch,BL", [(CompactLaunch(), 256), (CompactLaunch(BL=32, warps=2), 32)],
                         ids=["gpu_default", "small"])
def test_compaction_launch(kernel_device, monkeypatch, launch, BL):
    """L = 5000: the default tile is 256 wide (~32 tiles per row, 20 here, the last partial)."""
    from kernels.hebbian.sparse_step import compact_nonzero
    counts = spy(monkeypatch, sparse_step, "count_tile_nonzero_kernel")
    x, y = sparse(3, 5000, device=kernel_device), sparse(3, 5000, device=kernel_device)
    idx, count = compact_nonzero(x, y, launch=launch)
    for r, rows in enumerate(active_rows_naive(x, y)):
        assert int(count[r]) == rows.numel() > 0
        assert torch.equal(idx[r, :int(count[r])].long().cpu(), rows.cpu())
    (grid, kw), = counts.calls
    assert kw["BL"] == BL and grid == (triton.cdiv(5000, BL), 3)
    assert kw["num_warps"] == launch.warps


# ------------------------------------------------------------------------------ sparse step
@pytest.mark.parametrize("launch", [SparseStepLaunch(),
                                    SparseStepLaunch(BK=16, BV=32, warps=2, splits=3, BL=16)],
                         ids=["gpu_default", "small"])
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "inclusive"])
def test_sparse_step_launch(kernel_device, poison_empty, monkeypatch, launch, strict):
    """K = 300 (10 index tiles of 32, 19 of 16), V = 160 (a full and a partial 128-wide column
    tile), q and k with different active rows, v shared by the heads, float16 inputs."""
    from kernels.hebbian.sparse_step import sparse_hebbian_step
    kernel = spy(monkeypatch, sparse_step, "sparse_hebbian_step_kernel")
    counts = spy(monkeypatch, sparse_step, "count_tile_nonzero_kernel")
    B, H, K, V = 2, 2, 300, 160
    q = sparse(B, H, K, device=kernel_device).half()
    k = sparse(B, H, K, device=kernel_device).half()
    v = torch.randn(B, 1, V, device=kernel_device).half()
    S0 = torch.randn(B, H, K, V, device=kernel_device)
    S = S0.clone()
    o, _ = sparse_hebbian_step(q, k, v, S, scale=0.3, strict=strict, backend="triton",
                               launch=launch)
    S_ref = S0.double()
    o_ref, _ = sparse_hebbian_step_naive(q, k, v, S_ref, scale=0.3, strict=strict)
    assert o.dtype == torch.float16
    assert_rel_close(o, o_ref, 2e-3, "o")
    assert_rel_close(S, S_ref, 1e-6, "state")
    (grid, kw), = kernel.calls
    assert (kw["BK"], kw["BV"], kw["num_warps"]) == (pow2_tile(K, launch.BK),
                                                     pow2_tile(V, launch.BV), launch.warps)
    assert grid[1:] == (triton.cdiv(V, kw["BV"]), B * H)
    if launch.splits:
        assert grid[0] == launch.splits
    BL = counts.calls[0][1]["BL"]
    assert BL == (launch.BL or 128)                     # the rule: ~32 tiles per row, >= 128


@pytest.mark.parametrize("launch", [SparseStepLaunch(),
                                    SparseStepLaunch(BK=16, BV=64, warps=8, splits=5, BL=64)],
                         ids=["gpu_default", "small"])
def test_sparse_rows_matmul_launch(kernel_device, poison_empty, monkeypatch, launch):
    """L = 300, D = 200: y = x @ weight over x's non-zeros, float32, three rows."""
    from kernels.hebbian.sparse_step import sparse_rows_matmul
    kernel = spy(monkeypatch, sparse_step, "sparse_rows_matmul_kernel")
    x = sparse(3, 300, device=kernel_device)
    w = torch.randn(300, 200, device=kernel_device)
    y = sparse_rows_matmul(x, w, backend="triton", launch=launch)
    assert_rel_close(y, sparse_rows_matmul_naive(x.double(), w.double()), 1e-5, "y")
    (grid, kw), = kernel.calls
    assert (kw["BK"], kw["BD"], kw["num_warps"]) == (pow2_tile(300, launch.BK),
                                                     pow2_tile(200, launch.BV), launch.warps)
    assert grid[1:] == (triton.cdiv(200, kw["BD"]), 3)
    if launch.splits:
        assert grid[0] == launch.splits


# ---------------------------------------------------------------------- fused decode pieces
@pytest.mark.parametrize("launch", [EncodeRopeLaunch(),
                                    EncodeRopeLaunch(BP=8, BB=16, BD=16, warps=2)],
                         ids=["gpu_default", "small"])
def test_encode_rope_launch(kernel_device, poison_empty, monkeypatch, launch):
    """xs = relu(x @ enc) per head, qk = RoPE(xs) at a device-held position, and the non-zeros
    of qk per 2·BP-wide tile; B = 17 crosses the 16-row blocks, D = 80 the 64-wide D steps."""
    kernel = spy(monkeypatch, decode_fused, "encode_rope_kernel")
    B, D, NH, N, pos = 17, 80, 2, 256, 1234
    x = torch.randn(B, D, device=kernel_device)
    enc = torch.randn(NH, D, N, device=kernel_device) * 0.1
    xs, qk, tiles, width = decode_fused.encode_rope(
        x, enc, pair_freqs64(N, kernel_device), torch.tensor([pos], device=kernel_device),
        launch=launch)
    xs_ref = torch.relu(torch.einsum("bd,hdn->hbn", x.double(), enc.double()))
    assert_rel_close(xs, xs_ref, 1e-5, "xs")
    qk_ref = rotate_reference(xs_ref.transpose(0, 1)[:, :, None], pos, inverse=False)[:, :, 0]
    assert_rel_close(qk, qk_ref, 1e-5, "qk")
    assert width == 2 * launch.BP
    nonzero = (qk != 0).view(B * NH, N // width, width).sum(-1).int()
    assert torch.equal(tiles, nonzero)
    (grid, kw), = kernel.calls
    assert (kw["BP"], kw["BB"], kw["BD"], kw["num_warps"]) == (
        launch.BP, launch.BB, launch.BD, launch.warps)
    assert grid == (N // width, NH, triton.cdiv(B, launch.BB))


@pytest.mark.parametrize("launch", [EncodeGateLaunch(),
                                    EncodeGateLaunch(BN=32, BB=16, BD=32, warps=2)],
                         ids=["gpu_default", "small"])
def test_encode_gate_launch(kernel_device, poison_empty, monkeypatch, launch):
    """xy = xs · relu(a @ enc_v) laid out [B, NH·N], and its non-zeros per BN-wide tile."""
    kernel = spy(monkeypatch, decode_fused, "encode_gate_kernel")
    B, D, NH, N = 17, 80, 2, 256
    a = torch.randn(B, NH, D, device=kernel_device)
    enc_v = torch.randn(NH, D, N, device=kernel_device) * 0.1
    xs = torch.relu(torch.randn(NH, B, N, device=kernel_device))
    xy, tiles, BN = decode_fused.encode_gate(a, enc_v, xs, launch=launch)
    ys = torch.relu(torch.einsum("bhd,hdn->bhn", a.double(), enc_v.double()))
    xy_ref = (xs.double().transpose(0, 1) * ys).reshape(B, NH * N)
    assert_rel_close(xy, xy_ref, 1e-5, "xy")
    assert BN == launch.BN
    assert torch.equal(tiles, (xy != 0).view(B, NH * N // BN, BN).sum(-1).int())
    (grid, kw), = kernel.calls
    assert (kw["BN"], kw["BB"], kw["BD"], kw["num_warps"]) == (
        launch.BN, launch.BB, launch.BD, launch.warps)
    assert grid == (N // BN, NH, triton.cdiv(B, launch.BB))


@pytest.mark.parametrize("launch", [ReduceLaunch(), ReduceLaunch(BC=64, warps=2)],
                         ids=["gpu_default", "wide"])
def test_reduce_launches(kernel_device, poison_empty, monkeypatch, launch):
    """Both column-parallel reduces, NS = 70 partials of V = 300 columns: the plain sum
    (step.reduce_partials) and the sum + LayerNorm + residual (decode_fused.reduce_layernorm)."""
    plain = spy(monkeypatch, step, "fused_recurrent_hebbian_reduce_kernel")
    fused = spy(monkeypatch, decode_fused, "reduce_layernorm_kernel")
    R, NS, V = 3, 70, 300
    part = torch.randn(R, NS, V, device=kernel_device)
    res = torch.randn(R, V, device=kernel_device)
    out = step.reduce_partials(part, torch.empty(R, V, device=kernel_device), launch)
    assert_rel_close(out, part.double().sum(1), 1e-6, "sum")
    out = decode_fused.reduce_layernorm(part, torch.float32, 1e-5, res=res, launch=launch)
    ln = layer_norm(part.double().sum(1), (V,), eps=1e-5)
    assert_rel_close(out, layer_norm(res.double() + ln, (V,), eps=1e-5), 1e-5, "LN")
    BC = launch.BC or 16                             # the rule at R = 3: 16 columns
    for s in (plain, fused):
        (grid, kw), = s.calls
        assert grid == (triton.cdiv(V, BC), R) and kw["num_warps"] == launch.warps


# ------------------------------------------------------------------ defaults and refusals
@pytest.mark.skipif(not INTERPRET, reason="the interpreter's defaults")
def test_a_call_without_launch_takes_the_interpreter_defaults(monkeypatch):
    kernel = spy(monkeypatch, step, "fused_recurrent_hebbian_step_kernel")
    q, k, v = torch.randn(1, 2, 100), torch.randn(1, 2, 100), torch.randn(1, 2, 40)
    hebbian_step(q, k, v, torch.zeros(1, 2, 100, 40), backend="triton")
    small = launches.INTERPRETER_DEFAULTS[StepLaunch]
    assert small != StepLaunch()
    assert kernel.calls[0][1]["BK"] == pow2_tile(100, small.BK)


@pytest.mark.gpu
def test_the_tuning_cache_sets_the_default_launch(monkeypatch, tmp_path):
    """A sweep's stored winner for the call's shape class is what a call without launch= gets;
    an entry the dataclass refuses leaves the defaults."""
    monkeypatch.setenv("GLASSBRAIN_TUNING_DIR", str(tmp_path))
    kernel = spy(monkeypatch, step, "fused_recurrent_hebbian_step_kernel")
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 2, n, device=dev) for n in (256, 256, 128))
    cls = shape_class(K=256, V=128, BH=length_bucket(2), dtype=torch.float32)
    for entry, want in (({"BK": 32, "warps": 4}, (32, 128, 4)), ({"BK": 100}, (128, 128, 8))):
        store_tuned("hebbian_step", dev, cls, entry)
        hebbian_step(q, k, v, torch.zeros(1, 2, 256, 128, device=dev), backend="triton")
        kw = kernel.calls[-1][1]
        assert (kw["BK"], kw["BV"], kw["num_warps"]) == want


def test_fwd_mode_environment_sets_the_default_chunk_launch(monkeypatch):
    monkeypatch.setenv("GLASSBRAIN_FWD_MODE", "fused")
    assert default_chunk_launch(1, 2, 64, 64, torch.float32, "cpu").mode == "fused"
    monkeypatch.setenv("GLASSBRAIN_FWD_MODE", "fastest")
    with pytest.raises(ValueError, match="GLASSBRAIN_FWD_MODE.*fastest"):
        default_chunk_launch(1, 2, 64, 64, torch.float32, "cpu")


@pytest.mark.parametrize("make,err,match", [
    (lambda: StepLaunch(BK=100), ValueError, r"StepLaunch.BK: expected a power of two.*100"),
    (lambda: StepLaunch(BV=8), ValueError, r"StepLaunch.BV: .*>= 16.*8"),
    (lambda: StepLaunch(warps=3), ValueError, r"StepLaunch.warps: expected one of.*3"),
    (lambda: StepLaunch(BK=64.0), TypeError, r"StepLaunch.BK: expected an int, got float"),
    (lambda: ChunkLaunch(mode="fastest"), ValueError, r"ChunkLaunch.mode.*'fastest'"),
    (lambda: ChunkLaunch(BT=256), ValueError, r"ChunkLaunch.BT: .*\[16, 128\] or 0.*256"),
    (lambda: SparseStepLaunch(splits=-1), ValueError, r"SparseStepLaunch.splits.*-1"),
    (lambda: EncodeRopeLaunch(BP=4), ValueError, r"EncodeRopeLaunch.BP: .*>= 8.*4"),
    (lambda: ReduceLaunch(BC=True), TypeError, r"ReduceLaunch.BC: expected an int, got bool"),
])
def test_bad_launch_fields_are_refused(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_a_launch_of_the_wrong_kind_is_refused_before_any_work():
    from kernels.hebbian.sparse_step import (compact_nonzero, sparse_hebbian_step,
                                             sparse_rows_matmul)
    q, k, v = torch.randn(1, 2, 16), torch.randn(1, 2, 16), torch.randn(1, 2, 8)
    S0 = torch.randn(1, 2, 16, 8)
    for call in (lambda S: hebbian_step(q, k, v, S, launch=ChunkLaunch()),
                 lambda S: sparse_hebbian_step(q, k, v, S, launch=StepLaunch())):
        S = S0.clone()
        with pytest.raises(TypeError, match="launch: expected None or a .*, got"):
            call(S)
        assert torch.equal(S, S0)
    for call in (lambda: hebbian_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                           launch=StepLaunch()),
                 lambda: sparse_rows_matmul(q[0], torch.randn(16, 4), launch=CompactLaunch()),
                 lambda: compact_nonzero(q[0], launch={"BL": 64})):
        with pytest.raises(TypeError, match="launch: expected None or a"):
            call()


# ------------------------------------------------------------ no per-length specialisation
class VariantSpy(KernelSpy):
    """Stands in for a Triton kernel and records the compiled variant each launch selects:
    Triton's own key of every argument (a constexpr's value; otherwise its type and the classes
    Triton specialises on, == 1 and divisibility by 16, unless the kernel marks it
    do_not_specialize) plus the launch options (warps, stages). Equal keys run one compiled
    kernel. It launches nothing (what is launched does not depend on what kernels compute), so
    long prompts cost no interpreter time."""

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(variant_key(self.kernel, args, kw))


def kernel_params(kernel):
    """The kernel's parameters as Triton's JIT describes them (KernelParam), also under the
    interpreter, whose InterpretedFunction keeps only the jit keywords."""
    import inspect
    from triton.runtime.jit import KernelParam
    if hasattr(kernel, "params"):
        return kernel.params
    dns = kernel.kwargs.get("do_not_specialize") or ()
    dns_oa = kernel.kwargs.get("do_not_specialize_on_alignment") or ()
    return [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
            for i, p in enumerate(inspect.signature(kernel.fn).parameters.values())]


def variant_key(kernel, args, kw) -> tuple:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    params = kernel_params(kernel)
    names = [p.name for p in params]
    assert len(args) + len([k for k in kw if k in names]) == len(names), kernel.fn.__name__
    bound = dict(zip(names, args), **{k: v for k, v in kw.items() if k in names})
    key = [kernel.fn.__name__]
    for p in params:
        x = bound[p.name]
        key.append((p.name, x) if p.is_constexpr else (p.name, native_specialize_impl(
            BaseBackend, x, p.is_const, not p.do_not_specialize,
            not p.do_not_specialize_on_alignment)))
    return tuple(key) + tuple(sorted((k, v) for k, v in kw.items() if k not in names))


def spy_every_kernel(monkeypatch) -> list[VariantSpy]:
    """A VariantSpy on every launched Triton kernel of the Hebbian chunked path, the dense
    step and RoPE (the jit helpers they call are not launched, and stay as they are)."""
    from kernels.hebbian import chunk_grad, chunk_output, chunk_state
    from kernels.rope import triton_rotate
    spies = []
    for module in (chunk_state, chunk_output, chunk_grad, step, triton_rotate):
        for name in dir(module):
            if name.endswith("_kernel"):
                spies.append(VariantSpy(getattr(module, name)))
                monkeypatch.setattr(module, name, spies[-1])
    return spies


def run_a_prompt(T: int, device) -> None:
    """Every launch a prompt of T tokens makes: hebbian_attention forward and backward at chunk
    64 (split with per-head v; fused with v shared by the heads; a varlen row of three
    sequences, one empty, whose lengths follow T), one decode step, and the prompt's RoPE."""
    from kernels.rope.triton_rotate import rope_rotate_triton
    H, K, V = 2, 16, 16
    split = ChunkLaunch(mode="split", BT=64, BT_bwd=64, h_BK=16, h_BV=16, o_BV=16)
    fused = ChunkLaunch(mode="fused", BT=64, BT_bwd=64, fused_BK=16, fused_BV=16)
    cu = torch.tensor([0, T // 3, T // 3, T], dtype=torch.int32, device=device)
    g = torch.full((H,), 0.9, device=device)
    for launch, hv, kw in ((split, H, {}), (fused, 1, {}), (split, 1, dict(cu_seqlens=cu))):
        q, k = (torch.randn(1, H, T, K, device=device, requires_grad=True) for _ in range(2))
        v = torch.randn(1, hv, T, V, device=device, requires_grad=True)
        h0 = torch.randn(3 if kw else 1, H, K, V, device=device, requires_grad=True)
        o, S = hebbian_attention(q, k, v, decay=g, initial_state=h0, output_final_state=True,
                                 backend="triton", launch=launch, **kw)
        (o.sum() + S.sum()).backward()
    with torch.no_grad():
        hebbian_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], torch.zeros(1, H, K, V, device=device),
                     decay=g, backend="triton")
    rope_rotate_triton(torch.randn(1, H, T, 32, device=device), T, False,
                       pair_freqs64(32, device))


def prompt_variants(T: int, device, monkeypatch) -> set:
    spies = spy_every_kernel(monkeypatch)
    run_a_prompt(T, device)
    monkeypatch.undo()
    return {key for s in spies for key in s.calls}


def test_a_new_prompt_length_compiles_nothing_new(kernel_device, monkeypatch):
    """T = 1000, 1500, 1999 at chunk 64 (16, 24 and 32 chunks: T and the chunk counts in each
    class Triton would split them into) select the same compiled variants of every kernel."""
    seen = {T: prompt_variants(T, kernel_device, monkeypatch) for T in (1000, 1500, 1999)}
    assert {key[0] for key in seen[1000]} == {
        "chunk_hebbian_fwd_h_kernel", "chunk_hebbian_fwd_o_kernel",
        "chunk_hebbian_fwd_fused_kernel", "chunk_hebbian_bwd_dh_kernel",
        "chunk_hebbian_bwd_dA_kernel", "chunk_hebbian_bwd_dqk_kernel",
        "chunk_hebbian_bwd_dv_kernel", "fused_recurrent_hebbian_step_kernel",
        "fused_recurrent_hebbian_reduce_kernel", "rope_rotate_kernel"}
    for T in (1500, 1999):
        new = seen[T] - seen[1000]
        assert not new, f"T = {T} compiles new variants of {sorted({k[0] for k in new})}"


def test_no_length_is_a_specialisation_key(kernel_device, monkeypatch):
    """Nothing in the Hebbian path is chosen by length at all: one token, a prompt of one
    chunk, lengths divisible by 16 and past one segment (two segments at 20,000 tokens) select
    the variants of T = 1000 too."""
    base = prompt_variants(1000, kernel_device, monkeypatch)
    for T in (1, 37, 2048, 20000):
        new = prompt_variants(T, kernel_device, monkeypatch) - base
        assert not new, f"T = {T} compiles new variants of {sorted({k[0] for k in new})}"

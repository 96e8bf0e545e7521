"""The sparse decoding step: Triton kernels that touch only the active (non-zero) neurons.

After training, BDH's xs is 17–23% dense and xy 1.3–2.7%, so most rows of the Hebbian state and
of the decoder are dead weight at a decoding step:

    o = scale · q S          only rows r with q_r ≠ 0 contribute
    S ← S + kᵀ v             only rows r with k_r ≠ 0 change   (strict: o before the update)
    y = x @ W                only rows j of W with x_j ≠ 0 are read    (BDH: xy @ decoder)

Three kernels, all free of host synchronisation (so the step can live inside a CUDA graph):

  compact   writes the ascending positions of the non-zeros of each row r of x [R, L] (or of
            x's and y's: the union) into a fixed-capacity int32 buffer idx[r, :L] and their
            number into count[r]. Two launches over (BL-wide tile, row): the tiles' counts,
            then each tile prefix-sums its mask (tl.cumsum) and writes after the counts of the
            tiles before it. Deterministic (ascending order), no atomics; entries past count[r]
            are left unwritten and never read.
  step      grid (NS, cdiv(V, BV), B·H). Program (s, ·, bh) takes the index tiles s, s+NS,
            s+2·NS, … of row bh, BK indices each, up to count[bh] (a loop with a device-side
            bound, masked in its last tile): it gathers those rows of S ([BK, BV] tiles),
            accumulates q_r S_r into a [BV] partial, writes S_r + k_r v back, and stores its
            partial. The active rows of one bh are disjoint across programs, so the in-place
            update needs no atomics. A tiny kernel (the dense step's reduce) sums the NS
            partials in a fixed order: the result is deterministic.
  rows      y[r] = Σ_j x[r, idx_j] · W[idx_j, :] with the same tiling (R rows, D columns) and
            the same reduce.

Rows outside the active set are neither read nor written: their state stays bit-for-bit.
Decay is not offered: γ S touches every row, which a sparse step cannot avoid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import resolve_backend
from ..launch import INTERPRET, length_bucket, pow2_tile
from .function import check_grid
from .launches import CompactLaunch, SparseStepLaunch, check_launch, default_launch
from .sparse_naive import sparse_hebbian_step_naive, sparse_rows_matmul_naive
from .step import reduce_partials
from .validate import check_same_device, check_step_inputs, check_tensor

SPARSE_BACKENDS = ("auto", "triton", "torch")


@triton.jit
def _active(x, y, i_r, o_l, m_l, L, HAS_Y: tl.constexpr):
    """The mask of non-zeros of x (or of x or y) at positions o_l of row i_r."""
    b_m = (tl.load(x + i_r * L + o_l, mask=m_l, other=0.) != 0) & m_l
    if HAS_Y:
        b_m = b_m | ((tl.load(y + i_r * L + o_l, mask=m_l, other=0.) != 0) & m_l)
    return b_m


@triton.jit
def count_tile_nonzero_kernel(x, y, tiles, L, NT, BL: tl.constexpr, HAS_Y: tl.constexpr):
    """tiles[r, t] = number of non-zeros of row r in positions [t·BL, (t+1)·BL). grid (NT, R)."""
    i_t, i_r = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_l = i_t * BL + tl.arange(0, BL)
    b_m = _active(x, y, i_r, o_l, o_l < L, L, HAS_Y)
    tl.store(tiles + i_r * NT + i_t, tl.sum(b_m.to(tl.int32), axis=0))


@triton.jit
def compact_tile_kernel(x, y, tiles, idx, count, L, NT, BL: tl.constexpr, BT: tl.constexpr,
                        HAS_Y: tl.constexpr):
    """Writes tile t's non-zero positions after those of tiles < t (an exclusive sum of the
    tile counts), so idx[r, :count[r]] is ascending. grid (NT, R)."""
    i_t, i_r = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_t = tl.arange(0, BT)
    b_c = tl.load(tiles + i_r * NT + o_t, mask=o_t < NT, other=0)
    before = tl.sum(tl.where(o_t < i_t, b_c, 0), axis=0)
    o_l = i_t * BL + tl.arange(0, BL)
    b_m = _active(x, y, i_r, o_l, o_l < L, L, HAS_Y)
    b_slot = before + tl.cumsum(b_m.to(tl.int32), axis=0) - 1          # where each one goes
    tl.store(idx + i_r * L + b_slot, o_l.to(tl.int32), mask=b_m)
    tl.store(count + i_r, tl.sum(b_c, axis=0), mask=i_t == 0)


@triton.jit
def sparse_hebbian_step_kernel(q, k, v, state, idx, count, part, scale, H, HV, K, V, NS,
                               BK: tl.constexpr, BV: tl.constexpr, STRICT: tl.constexpr):
    i_s, i_v = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_v = tl.load(v + (i_b * HV + i_h % HV) * V + o_v, mask=m_v, other=0.).to(tl.float32)
    n = tl.load(count + i_bh)
    b_o = tl.zeros([BV], dtype=tl.float32)
    for start in range(i_s * BK, n, NS * BK):
        o_j = start + tl.arange(0, BK)
        m_j = o_j < n
        o_r = tl.load(idx + i_bh * K + o_j, mask=m_j, other=0).to(tl.int64)   # active rows
        b_q = tl.load(q + i_bh * K + o_r, mask=m_j, other=0.).to(tl.float32) * scale
        b_k = tl.load(k + i_bh * K + o_r, mask=m_j, other=0.).to(tl.float32)
        m_rv = m_j[:, None] & m_v[None, :]
        p_s = state + i_bh * K * V + (o_r[:, None] * V + o_v[None, :])
        b_s = tl.load(p_s, mask=m_rv, other=0.)
        if STRICT:
            b_o += tl.sum(b_q[:, None] * b_s, axis=0)
        b_s += b_k[:, None] * b_v[None, :]
        if not STRICT:
            b_o += tl.sum(b_q[:, None] * b_s, axis=0)
        tl.store(p_s, b_s, mask=m_rv)
    tl.store(part + (i_bh * NS + i_s) * V + o_v, b_o, mask=m_v)


@triton.jit
def sparse_rows_matmul_kernel(x, w, idx, count, part, L, D, NS,
                              BK: tl.constexpr, BD: tl.constexpr):
    """part[r, s] = Σ over index tiles s, s+NS, … of x[r, j] · w[j, :].
    grid (NS, cdiv(D, BD), R)."""
    i_s, i_d = tl.program_id(0), tl.program_id(1)
    i_r = tl.program_id(2).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    n = tl.load(count + i_r)
    b_y = tl.zeros([BD], dtype=tl.float32)
    for start in range(i_s * BK, n, NS * BK):
        o_j = start + tl.arange(0, BK)
        m_j = o_j < n
        o_l = tl.load(idx + i_r * L + o_j, mask=m_j, other=0).to(tl.int64)
        b_x = tl.load(x + i_r * L + o_l, mask=m_j, other=0.).to(tl.float32)
        b_w = tl.load(w + (o_l[:, None] * D + o_d[None, :]),
                      mask=m_j[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_y += tl.sum(b_x[:, None] * b_w, axis=0)
    tl.store(part + (i_r * NS + i_s) * D + o_d, b_y, mask=m_d)


# ----------------------------------------------------------------------------- launchers

def _splits(n_tiles: int, programs: int, device: torch.device, splits: int) -> int:
    """How many programs share one row's index tiles: ``splits`` (at most one per index tile),
    or when that is 0 the rule: the active count is on the device (unknown here), so aim for
    ~4 programs per SM over the whole grid; 2 on the CPU (still exercises the split and the
    reduce)."""
    if splits:
        return min(n_tiles, splits)
    if device.type != "cuda":
        return min(2, n_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(4 * sms, programs)))


def compact_nonzero_triton(x, y=None, *, idx=None, count=None,
                           launch: CompactLaunch | None = None):
    """x (and y) [R, L] contiguous → (idx int32 [R, L], count int32 [R]). Validated by caller.

    Two launches, each with one program per (tile, row): tile counts, then each tile writes its
    positions after the exclusive sum of the counts before it. Why not one program per row
    walking L: at decode (R = B·nh = 4 rows of 8192, or 1 row of 32768 for the decoder) that is
    4 programs in a serial loop, and it cost more than the rows it saved (H200, bench_bdh)."""
    R, L = x.shape
    launch = launch or default_launch(CompactLaunch, "hebbian_compact", x.device,
                                      R=length_bucket(R), L=L)
    # ~32 tiles per row (at most 64 under BL's floor), so the tile-count row fits one block.
    BL = pow2_tile(L, launch.BL or max(128, triton.next_power_of_2(triton.cdiv(L, 32))))
    NT = triton.cdiv(L, BL)
    tiles = torch.empty(R, NT, dtype=torch.int32, device=x.device)
    count_tile_nonzero_kernel[(NT, R)](x, y if y is not None else x, tiles, L, NT, BL=BL,
                                       HAS_Y=y is not None, num_warps=launch.warps)
    return compact_from_tiles(x, tiles, BL, idx, count, y=y, warps=launch.warps)


def compact_from_tiles(x, tiles, BL: int, idx=None, count=None, *, y=None, warps: int = 4):
    """The second pass of the compaction, for tile counts already written (by
    `count_tile_nonzero_kernel`, or fused into another kernel): x (and y) [R, L] contiguous,
    tiles int32 [R, cdiv(L, BL)] (non-zeros of x, or of x or y, per BL-wide tile; BL is the
    layout of ``tiles``, set by whoever wrote them). Returns (idx int32 [R, L], count int32
    [R])."""
    R, L = x.shape
    NT = tiles.shape[1]
    if idx is None:
        idx = torch.empty(R, L, dtype=torch.int32, device=x.device)
    if count is None:
        count = torch.empty(R, dtype=torch.int32, device=x.device)
    compact_tile_kernel[(NT, R)](x, y if y is not None else x, tiles, idx, count, L, NT, BL=BL,
                                 BT=max(16, triton.next_power_of_2(NT)), HAS_Y=y is not None,
                                 num_warps=warps)
    return idx, count


def sparse_hebbian_step_triton(q, k, v, state, idx, count, *, scale=1.0, strict=True,
                               launch: SparseStepLaunch | None = None):
    """q, k [B,H,K] contiguous; v [B,H|1,V] contiguous; state [B,H,K,V] float32 contiguous,
    updated in place; idx int32 [B·H, K] / count int32 [B·H] (the union of q's and k's
    non-zeros, or any superset). Returns (o [B,H,V] in v's dtype, state)."""
    part = sparse_step_partials(q, k, v, state, idx, count, scale=scale, strict=strict,
                                launch=launch)
    B, H = q.shape[:2]
    o = torch.empty(B, H, v.shape[2], dtype=v.dtype, device=q.device)
    reduce_partials(part, o.view(B * H, v.shape[2]))
    return o, state


def sparse_step_launch(B: int, H: int, K: int, V: int, dtype, device) -> SparseStepLaunch:
    """The default launch of the sparse step (`launches.default_launch`)."""
    return default_launch(SparseStepLaunch, "hebbian_sparse_step", device, K=K, V=V,
                          BH=length_bucket(B * H), dtype=dtype)


def sparse_rows_launch(R: int, L: int, D: int, dtype, device) -> SparseStepLaunch:
    """The default launch of the sparse rows product (`launches.default_launch`)."""
    return default_launch(SparseStepLaunch, "hebbian_sparse_rows", device, L=L, D=D,
                          R=length_bucket(R), dtype=dtype)


def sparse_step_partials(q, k, v, state, idx, count, *, scale=1.0, strict=True,
                         launch: SparseStepLaunch | None = None):
    """The step kernel alone: updates state in place and returns its float32 partial sums of
    o, [B·H, NS, V] (o = their sum over NS, in a fixed order)."""
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    launch = launch or sparse_step_launch(B, H, K, V, q.dtype, q.device)
    BK, BV = pow2_tile(K, launch.BK), pow2_tile(V, launch.BV)
    n_v = triton.cdiv(V, BV)
    NS = _splits(triton.cdiv(K, BK), B * H * n_v, q.device, launch.splits)
    part = torch.empty(B * H, NS, V, dtype=torch.float32, device=q.device)
    sparse_hebbian_step_kernel[(NS, n_v, B * H)](
        q, k, v, state, idx, count, part, float(scale), H, HV, K, V, NS,
        BK=BK, BV=BV, STRICT=bool(strict), num_warps=launch.warps)
    return part


def sparse_rows_matmul_triton(x, weight, idx, count, *, launch: SparseStepLaunch | None = None):
    """x [R, L], weight [L, D] contiguous; idx/count: x's non-zeros.
    Returns y [R, D] in x's dtype."""
    part = sparse_rows_partials(x, weight, idx, count, launch=launch)
    return reduce_partials(part, torch.empty(x.shape[0], weight.shape[1], dtype=x.dtype,
                                             device=x.device))


def sparse_rows_partials(x, weight, idx, count, *, launch: SparseStepLaunch | None = None):
    """The rows kernel alone: float32 partial sums [R, NS, D] of y = x @ weight (the launch's
    BV is the column tile over D)."""
    R, L = x.shape
    D = weight.shape[1]
    launch = launch or sparse_rows_launch(R, L, D, x.dtype, x.device)
    BK, BD = pow2_tile(L, launch.BK), pow2_tile(D, launch.BV)
    n_d = triton.cdiv(D, BD)
    NS = _splits(triton.cdiv(L, BK), R * n_d, x.device, launch.splits)
    part = torch.empty(R, NS, D, dtype=torch.float32, device=x.device)
    sparse_rows_matmul_kernel[(NS, n_d, R)](x, weight, idx, count, part, L, D, NS,
                                            BK=BK, BD=BD, num_warps=launch.warps)
    return part


# ----------------------------------------------------------------------------- public API

def _resolve(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device, SPARSE_BACKENDS)


def _check_index_buffers(idx, count, R: int, L: int, device) -> None:
    """idx int32 [R, L] and count int32 [R], contiguous, on ``device`` (or both None)."""
    if (idx is None) != (count is None):
        raise ValueError("idx, count: pass both (a compaction's output) or neither")
    if idx is None:
        return
    for name, t, shape in (("idx", idx, [R, L]), ("count", count, [R])):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected an int32 tensor {shape}, got {got}")
        if list(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def compact_nonzero(x, y=None, *, idx=None, count=None, launch: CompactLaunch | None = None):
    """The active positions of each row of x [R, L] (of x or y, when y [R, L] is given), on the
    device with no host sync: returns (idx int32 [R, L], count int32 [R]) with idx[r, :count[r]]
    the ascending positions j where x[r, j] ≠ 0 (or y[r, j] ≠ 0); entries past count[r] are
    unspecified. ``idx`` / ``count`` may be given to be filled (fixed buffers for CUDA graphs).
    Runs the Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1) with the tiles of
    ``launch`` (`CompactLaunch`; None: the default for the shape)."""
    check_launch(launch, CompactLaunch)
    check_tensor("x", x, 2, "[R, L]")
    if y is not None:
        check_tensor("y", y, 2, "[R, L]")
        if y.shape != x.shape:
            raise ValueError(f"y: expected shape {list(x.shape)} (same as x), got {list(y.shape)}")
        check_same_device(x=x, y=y)
    R, L = x.shape
    if R == 0 or L == 0:
        raise ValueError(f"x: expected R >= 1 and L >= 1, got shape {list(x.shape)}")
    _resolve("triton", x.device)
    _check_index_buffers(idx, count, R, L, x.device)
    return compact_nonzero_triton(x.contiguous(), None if y is None else y.contiguous(),
                                  idx=idx, count=count, launch=launch)


def sparse_hebbian_step(q, k, v, state, *, scale=1.0, strict=True, backend="auto",
                        idx=None, count=None, launch: SparseStepLaunch | None = None):
    """One decoding step of Hebbian attention that reads and writes only the active rows of the
    state; equal to `kernels.hebbian_step` (no decay) for any q, k:

        strict:     o = scale · q S,  then  S ← S + kᵀ v        inclusive: update, then read

    q, k [B,H,K]; v [B,H,V] or [B,1,V]; state [B,H,K,V] float32 contiguous, updated in place;
    rows r with q_r = k_r = 0 are neither read nor written. ``idx`` / ``count`` (int32
    [B·H, K] / [B·H]): precomputed active rows, e.g. `compact_nonzero(q.view(B*H, K))` when
    k is q; by default they are compacted here on the device. Backends: "triton" (CUDA, or the
    CPU under TRITON_INTERPRET=1), "torch" (the reference loop, `sparse_naive.py`: host
    syncs), "auto" (Triton on CUDA, else "torch"). ``launch``: the Triton kernels' tiles
    (`SparseStepLaunch`, its BL for the compaction; None: the default for the shape).
    Returns (o [B,H,V] in v's dtype, state)."""
    B, H, K, V = check_step_inputs(q, k, v, state, None, scale)
    check_launch(launch, SparseStepLaunch)
    kind = _resolve(backend, q.device)
    _check_index_buffers(idx, count, B * H, K, q.device)
    if not state.is_contiguous():
        raise ValueError("state: expected a contiguous tensor (it is updated in place), got "
                         f"strides {tuple(state.stride())}")
    if kind == "torch":
        return sparse_hebbian_step_naive(q, k, v, state, scale=scale, strict=strict)
    check_grid(B, H)
    if INTERPRET and (q.dtype == torch.bfloat16 or v.dtype == torch.bfloat16):
        o, state = sparse_hebbian_step(q.float(), k.float(), v.float(), state, scale=scale,
                                       strict=strict, backend=backend, idx=idx, count=count,
                                       launch=launch)
        return o.to(v.dtype), state
    same = k is q                        # BDH: q = k = RoPE(xs), one compaction input
    q, v = q.contiguous(), v.contiguous()
    k = q if same else k.contiguous()
    launch = launch or sparse_step_launch(B, H, K, V, q.dtype, q.device)
    if idx is None:
        idx, count = compact_nonzero_triton(q.view(B * H, K), None if same else k.view(B * H, K),
                                            launch=CompactLaunch(launch.BL))
    return sparse_hebbian_step_triton(q, k, v, state, idx, count, scale=scale, strict=strict,
                                      launch=launch)


def sparse_rows_matmul(x, weight, *, backend="auto", idx=None, count=None,
                       launch: SparseStepLaunch | None = None):
    """y = x @ weight reading only the rows of weight for x's non-zeros, per row of x:
    y[r] = Σ_{j: x[r,j] ≠ 0} x[r,j] · weight[j]. x [R, L]; weight [L, D] (BDH: xy as
    [B, nh·N] and the decoder [nh·N, D]). Accumulates in float32; returns y [R, D] in x's
    dtype. ``idx`` / ``count``: precomputed `compact_nonzero(x)`. Not differentiable
    (decoding only). Backends and ``launch`` as `sparse_hebbian_step` (BV: the tile over D)."""
    check_launch(launch, SparseStepLaunch)
    check_tensor("x", x, 2, "[R, L]")
    check_tensor("weight", weight, 2, "[L, D]")
    R, L = x.shape
    if weight.shape[0] != L:
        raise ValueError(f"weight: expected shape [L, D] with L = {L} (x's last dim), "
                         f"got {list(weight.shape)}")
    if R == 0 or L == 0 or weight.shape[1] == 0:
        raise ValueError(f"x, weight: expected R, L, D >= 1, got x {list(x.shape)}, "
                         f"weight {list(weight.shape)}")
    check_same_device(x=x, weight=weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError("sparse_rows_matmul is a decoding kernel and is not differentiable; "
                         "call it under torch.no_grad()")
    kind = _resolve(backend, x.device)
    _check_index_buffers(idx, count, R, L, x.device)
    if kind == "torch":
        return sparse_rows_matmul_naive(x, weight)
    if INTERPRET and (x.dtype == torch.bfloat16 or weight.dtype == torch.bfloat16):
        return sparse_rows_matmul(x.float(), weight.float(), backend=backend, idx=idx,
                                  count=count, launch=launch).to(x.dtype)
    x, weight = x.contiguous(), weight.contiguous()
    launch = launch or sparse_rows_launch(R, L, weight.shape[1], x.dtype, x.device)
    if idx is None:
        idx, count = compact_nonzero_triton(x, launch=CompactLaunch(launch.BL))
    return sparse_rows_matmul_triton(x, weight, idx, count, launch=launch)

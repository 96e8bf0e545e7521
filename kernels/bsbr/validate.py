"""Input checks for the `kernels.bsbr` entry points.

Every error names the argument, the value received and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import _shape, check_same_device, check_tensor
from ..checks import resolve_backend as resolve_any_backend

BACKENDS = ("auto", "triton", "torch", "reference")
TRITON_MAX_CHUNK = 256
TRITON_MAX_HEAD_DIM = 256          # whole K (and V) in one register tile


@dataclass
class Dims:
    B: int
    H: int
    Tq: int
    Tk: int
    K: int
    V: int
    M: int = 0
    n: int = 0


def check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")


def check_top_k(top_k):
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None (dense routing) or an int >= 1, got {top_k!r}")


def check_long_scale(long_scale, name: str = "long_scale") -> float:
    """λ of the routed term (out = local + λ · q Σ p F): a finite number > 0. ``name`` is the
    argument as the caller's user knows it (a module or config field)."""
    if isinstance(long_scale, bool) or not isinstance(long_scale, (int, float)) \
            or not 0 < long_scale < float("inf"):
        raise ValueError(f"{name}: expected a finite number > 0, got {long_scale!r}")
    return float(long_scale)


def check_scale(scale):
    """The softmax scale of the local attention: None (1/√K) or a finite number > 0."""
    return None if scale is None else check_long_scale(scale, "scale (None for 1/sqrt(K))")


def check_local_inputs(q, k, v, chunk_size, offset, scale=None) -> Dims:
    """q [B,H,Tq,K], k [B,H,Tk,K], v [B,H,Tk,V] with Tk = offset + Tq, 0 <= offset < chunk_size;
    scale None or a finite number > 0."""
    check_chunk_size(chunk_size)
    check_scale(scale)
    check_tensor("q", q, 4, "[B,H,Tq,K]")
    check_tensor("k", k, 4, "[B,H,Tk,K]")
    check_tensor("v", v, 4, "[B,H,Tk,V]")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < chunk_size:
        raise ValueError(f"offset: expected an int in [0, chunk_size) = [0, {chunk_size}), "
                         f"got {offset!r}")
    B, H, Tq, K = q.shape
    Tk = offset + Tq
    if _shape(k) != [B, H, Tk, K]:
        raise ValueError(f"k: expected shape [B,H,offset+Tq,K] = [{B}, {H}, {Tk}, {K}], "
                         f"got {_shape(k)}")
    if _shape(v)[:3] != [B, H, Tk]:
        raise ValueError(f"v: expected shape [B,H,offset+Tq,V] = [{B}, {H}, {Tk}, V], "
                         f"got {_shape(v)}")
    V = v.shape[3]
    if K == 0:
        raise ValueError(f"q: the key dimension K must be >= 1, got shape {_shape(q)}")
    if V == 0:
        raise ValueError(f"v: the value dimension V must be >= 1, got shape {_shape(v)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
    check_same_device(q=q, k=k, v=v)
    return Dims(B, H, Tq, Tk, K, V)


def check_states_inputs(k, v, hk, chunk_size) -> Dims:
    """k [B,H,T,K], v [B,H,T,V], hk [B,H,T,M] (T is Tq and Tk of the Dims)."""
    check_chunk_size(chunk_size)
    check_tensor("k", k, 4, "[B,H,T,K]")
    check_tensor("v", v, 4, "[B,H,T,V]")
    check_tensor("hk", hk, 4, "[B,H,T,M]")
    B, H, T, _ = k.shape
    if _shape(v)[:3] != [B, H, T]:
        raise ValueError(f"v: expected shape [B,H,T,V] = [{B}, {H}, {T}, V], got {_shape(v)}")
    if _shape(hk)[:3] != [B, H, T]:
        raise ValueError(f"hk: expected shape [B,H,T,M] = [{B}, {H}, {T}, M], got {_shape(hk)}")
    check_same_device(k=k, v=v, hk=hk)
    return Dims(B, H, T, T, k.shape[3], v.shape[3], hk.shape[3])


def check_bank(bank_F, bank_h, d: Dims, device, name_F="bank_F", name_h="bank_h"):
    """Returns n (0 when there is no bank)."""
    if bank_F is None and bank_h is None:
        return 0
    if bank_F is None or bank_h is None:
        missing = name_F if bank_F is None else name_h
        raise ValueError(f"{missing}: {name_F} and {name_h} come together; got None for {missing}")
    check_tensor(name_F, bank_F, 5, "[B,H,n,K,V]")
    check_tensor(name_h, bank_h, 4, "[B,H,n,M]")
    if bank_F.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name_F}: expected dtype torch.float32 (states are kept in float32), "
                        f"got {bank_F.dtype}")
    n = bank_F.shape[2]
    if _shape(bank_F) != [d.B, d.H, n, d.K, d.V]:
        raise ValueError(f"{name_F}: expected shape [B,H,n,K,V] = [{d.B}, {d.H}, n, {d.K}, "
                         f"{d.V}], got {_shape(bank_F)}")
    if _shape(bank_h) != [d.B, d.H, n, d.M]:
        raise ValueError(f"{name_h}: expected shape [B,H,n,M] = [{d.B}, {d.H}, {n}, {d.M}] "
                         f"(n from {name_F}), got {_shape(bank_h)}")
    for name, t in ((name_F, bank_F), (name_h, bank_h)):
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (same as q), got {t.device}")
    return n


def check_bsbr_inputs(q, k, v, r, hk, chunk_size, top_k, offset, bank_F, bank_h,
                      scale=None) -> Dims:
    d = check_local_inputs(q, k, v, chunk_size, offset, scale)
    check_top_k(top_k)
    check_tensor("r", r, 4, "[B,H,Tq,M]")
    check_tensor("hk", hk, 4, "[B,H,Tk,M]")
    d.M = r.shape[3]
    if _shape(r)[:3] != [d.B, d.H, d.Tq]:
        raise ValueError(f"r: expected shape [B,H,Tq,M] = [{d.B}, {d.H}, {d.Tq}, M], "
                         f"got {_shape(r)}")
    if _shape(hk) != [d.B, d.H, d.Tk, d.M]:
        raise ValueError(f"hk: expected shape [B,H,offset+Tq,M] = [{d.B}, {d.H}, {d.Tk}, "
                         f"{d.M}], got {_shape(hk)}")
    if d.M == 0:
        raise ValueError(f"r: the meta dimension M must be >= 1, got shape {_shape(r)}")
    check_same_device(q=q, r=r, hk=hk)
    d.n = check_bank(bank_F, bank_h, d, q.device)
    return d


def check_step_inputs(q, r, bank_F, bank_h, top_k) -> int:
    check_top_k(top_k)
    check_tensor("q", q, 3, "[B,H,K]")
    check_tensor("r", r, 3, "[B,H,M]")
    B, H, K = q.shape
    if _shape(r)[:2] != [B, H]:
        raise ValueError(f"r: expected shape [B,H,M] = [{B}, {H}, M], got {_shape(r)}")
    if bank_F is None or bank_h is None:
        raise ValueError("bank_F/bank_h: routed_readout_step needs the bank tensors "
                         "(use shape [B,H,0,K,V] / [B,H,0,M] for an empty bank), got None")
    check_tensor("bank_F", bank_F, 5, "[B,H,n,K,V]")
    d = Dims(B, H, 1, 1, K, bank_F.shape[-1], r.shape[2])
    check_same_device(q=q, r=r)
    return check_bank(bank_F, bank_h, d, q.device)


def resolve_backend(backend, device, dtype=None, chunk_size=1, head_dims=()) -> str:
    """`kernels.checks.resolve_backend` over BACKENDS, except that "auto" on CUDA takes the
    blockwise PyTorch path where the Triton kernels do not take these inputs (float64,
    chunk_size > TRITON_MAX_CHUNK, a head dim > TRITON_MAX_HEAD_DIM)."""
    kind = resolve_any_backend(backend, device, BACKENDS)
    fits = (dtype != torch.float64 and chunk_size <= TRITON_MAX_CHUNK
            and all(d <= TRITON_MAX_HEAD_DIM for d in head_dims))
    return "torch" if backend == "auto" and kind == "triton" and not fits else kind


def check_packed(cu_seqlens, d: Dims, offset=0):
    """A call with cu_seqlens packs its sequences into one row, each from its start: B = 1,
    offset 0 and no bank (the offsets themselves: `kernels.varlen.check_cu_seqlens`)."""
    if cu_seqlens is None:
        return
    if d.B != 1:
        raise ValueError(f"cu_seqlens: the sequences are packed into one row [1, H, total, ·] "
                         f"(layout bhtk) or [1, total, H, ·] (bthk), got a batch of {d.B} rows")
    if offset:
        raise ValueError(f"offset: with cu_seqlens every sequence starts at its first token "
                         f"(offset 0), got {offset}")
    if d.n:
        raise ValueError(f"bank_F: with cu_seqlens every sequence starts without a bank, got "
                         f"{d.n} bank slots (call each sequence with its own bank instead)")


def in_layout(bthk: bool, check, *args, **kw):
    """``check`` on the [B,H,T,·] views of a call's tensors; for a token-major call a shape
    error says that its listed shapes have dims 1 and 2 swapped."""
    try:
        return check(*args, **kw)
    except ValueError as exc:
        if not bthk:
            raise
        raise ValueError(f"{exc} (layout 'bthk': shapes are listed as [B,H,T,·], the inputs' "
                         f"[B,T,H,·] with dims 1 and 2 swapped)") from None


# Row offsets inside one batch element are int32 in the kernels: for a token-major tensor a
# batch element holds T·H·dim elements (head-major: T·dim per head).
INT32_ROWS = 2 ** 31


def check_triton_ok(q, chunk_size, name="q", bthk=False, tensors=()):
    """Limits of the Triton kernels (the torch/reference backends have none of these).
    tensors: the call's per-token tensors, checked against the int32 row offsets when
    token-major."""
    for t in tensors if bthk else ():
        if t.shape[1] * t.shape[2] * t.shape[3] >= INT32_ROWS:
            raise ValueError(f"layout: 'bthk' on the Triton backend takes T·H·dim < 2^31 per "
                             f"batch element, got {list(t.transpose(1, 2).shape)} (use 'bhtk')")
    if chunk_size > TRITON_MAX_CHUNK:
        raise ValueError(f"chunk_size: the Triton backend supports 1..{TRITON_MAX_CHUNK}, got "
                         f"{chunk_size} (use backend='torch')")
    if q.dtype == torch.float64:
        raise TypeError(f"{name}: the Triton backend takes float16, bfloat16 or float32, got "
                        "torch.float64 (use backend='torch' or 'reference' for float64)")
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise TypeError(f"{name}: bfloat16 is not supported under TRITON_INTERPRET=1 (the "
                        "interpreter mishandles bf16 loads); use float16/float32 on the CPU or "
                        "run on a GPU")

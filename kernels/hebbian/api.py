"""Public entry points: `hebbian_attention` (training / prefill) and `hebbian_step` (decoding).

Backends:
  "auto"      Triton on CUDA, the chunked PyTorch path on the CPU.
  "triton"    the Triton kernels; on the CPU only under TRITON_INTERPRET=1 (how CI tests them).
  "torch"     the chunked PyTorch path (cuBLAS on a GPU).
  "dense"     the masked quadratic form on cuBLAS: O(T²) but fast while T is small next to K
              (BDH training at T = 512); holds a [B,H,T,T] score matrix.
  "reference" the token-by-token recurrence (slow; an oracle).
"""
from __future__ import annotations

import torch

from . import dense, naive, torch_chunk
from ..checks import resolve_backend
from .launches import ChunkLaunch, StepLaunch, check_launch
from .validate import check_attention_call, check_step_inputs

BACKENDS = ("auto", "triton", "torch", "dense", "reference")


def _resolve_backend(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device, BACKENDS)


def hebbian_attention(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                      output_final_state=False, chunk_size=None, backend="auto",
                      launch: ChunkLaunch | None = None, cu_seqlens=None, layout="bhtk"):
    """Causal Hebbian (linear) attention with a float32 state S ∈ R^{K×V} per sequence and head.

    strict:     o_t = scale · q_t S_{t-1},  S_t = γ S_{t-1} + k_tᵀ v_t   (BDH)
    inclusive:  o_t = scale · q_t S_t

    layout "bhtk" (default): q, k [B,H,T,K]; v [B,H,T,V] or [B,1,T,V] (shared by all heads,
    never copied); o [B,H,T,V]. layout "bthk" (fla's and transformers' order): q, k [B,T,H,K];
    v [B,T,H,V] or [B,T,1,V]; o [B,T,H,V]. The Triton kernels read either layout in place when
    the tensors are contiguous in it (a transposed view is copied once); the other backends
    compute on transposed views. The layout is never guessed from the shapes: [B,T,H,K] passed
    as "bhtk" is a batch of T heads of H tokens.
    decay None or [H] in (0, 1]; initial_state None or [B,H,K,V] float32.
    Returns (o in v's dtype and the inputs' layout, S_final [B,H,K,V] float32 or None).
    Differentiable in q, k, v, initial_state and decay (every backend).

    cu_seqlens (varlen): N sequences packed along time into one row (batch size 1), sequence n
    at tokens cu_seqlens[n] … cu_seqlens[n+1] - 1; an int32 or int64 tensor [N + 1] on the
    inputs' device, from 0 to T, non-decreasing (empty sequences are allowed: their final state
    is their initial state). Each sequence is computed as if called alone: its state starts
    from initial_state[n] (None or [N,H,K,V] float32), its decay powers count from its own
    start, and S_final is [N,H,K,V], each sequence's state after its last token. The offsets
    are read on the host (one sync per call). "triton" cuts its chunks at the sequence starts
    (no padding); the other backends run the sequences one by one.

    Precision: "triton" runs float16 and float64 inputs in float32 (a float16 state overflows
    at 65504), and bf16 too under TRITON_INTERPRET (the interpreter mis-loads bf16). Under
    `torch.use_deterministic_algorithms(True)` it avoids the float32 atomics of the fused
    forward, so repeated calls give bitwise-equal outputs.

    launch: the Triton kernels' algorithm, chunks and tiles (`ChunkLaunch`); None takes the
    default for the shape (`plan.default_chunk_launch`). The other backends ignore it.
    """
    (B, H, T, K, V), offsets = check_attention_call(
        q, k, v, decay, initial_state, chunk_size, scale, layout=layout, cu_seqlens=cu_seqlens)
    check_launch(launch, ChunkLaunch)
    kind = _resolve_backend(backend, q.device)
    bthk = layout == "bthk"
    if kind == "triton":
        from .function import hebbian_attention_triton
        return hebbian_attention_triton(q, k, v, scale=scale, strict=strict, decay=decay,
                                        initial_state=initial_state,
                                        output_final_state=output_final_state,
                                        chunk_size=chunk_size, launch=launch, offsets=offsets,
                                        bthk=bthk)
    if bthk:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    opts = dict(scale=scale, strict=strict, decay=decay, kind=kind, chunk_size=chunk_size,
                final=output_final_state)
    if offsets is None:
        o, S = _attention_torch(q, k, v, initial_state, **opts)
    else:
        o, S = _per_sequence(q, k, v, initial_state, offsets, **opts)
    o = o.transpose(1, 2) if bthk else o
    if not output_final_state:
        return o, None
    S = S.float()
    # T = 0 leaves the state untouched: hand back a copy, never the caller's own tensor.
    return o, (S.clone() if S is initial_state else S)


def _attention_torch(q, k, v, initial_state, *, scale, strict, decay, kind, chunk_size, final):
    """One [B,H,T,·] call of a PyTorch backend; returns (o, S_final; "dense" forms S_final only
    when ``final``)."""
    if kind == "dense":
        return dense.dense_hebbian(q, k, v, scale=scale, strict=strict, decay=decay,
                                   initial_state=initial_state, output_final_state=final)
    if kind == "torch":
        return torch_chunk.chunk_hebbian_torch(q, k, v, scale=scale, strict=strict, decay=decay,
                                               initial_state=initial_state,
                                               chunk_size=chunk_size or 64)
    return naive.hebbian_recurrent(q, k, v, scale=scale, strict=strict, decay=decay,
                                   initial_state=initial_state)


def _per_sequence(q, k, v, initial_state, offsets, **opts):
    """A packed row [1,H,T,·], its sequences at ``offsets``, one call per sequence (exact: no
    padding token ever decays or feeds a state). Returns (o [1,H,T,V], S_final [N,H,K,V] or
    None when not ``final``)."""
    outs, states = [], []
    for n, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, S = _attention_torch(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], h0, **opts)
        outs.append(o)
        states.append(None if S is None else S.float())
    return torch.cat(outs, dim=2), (torch.cat(states, dim=0) if opts["final"] else None)


def hebbian_step(q, k, v, state, *, scale=1.0, strict=True, decay=None, backend="auto",
                 launch: StepLaunch | None = None):
    """One decoding step. q, k [B,H,K]; v [B,H,V] or [B,1,V]; state [B,H,K,V] float32, updated
    in place (and returned). Returns (o [B,H,V] in v's dtype, state). Not differentiable: inputs
    that require grad with grad enabled raise (use `hebbian_attention` for training).
    "triton" (and "auto" on CUDA) runs the Triton step, with the tiles of ``launch``
    (`StepLaunch`; None: the default for the shape); every other backend runs the same PyTorch
    step (one token has no chunked or dense form) and ignores ``launch``."""
    check_step_inputs(q, k, v, state, decay, scale)
    check_launch(launch, StepLaunch)
    kind = _resolve_backend(backend, q.device)
    if kind == "triton":
        from .step import hebbian_step_triton
        return hebbian_step_triton(q, k, v, state, scale=scale, strict=strict, decay=decay,
                                   launch=launch)
    return torch_chunk.step_hebbian_torch(q, k, v, state, scale=scale, strict=strict, decay=decay)

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
from .validate import check_attention_inputs, check_step_inputs

BACKENDS = ("auto", "triton", "torch", "dense", "reference")


def _resolve_backend(backend: str, device: torch.device) -> str:
    return resolve_backend(backend, device, BACKENDS)


def hebbian_attention(q, k, v, *, scale=1.0, strict=True, decay=None, initial_state=None,
                      output_final_state=False, chunk_size=None, backend="auto",
                      launch: ChunkLaunch | None = None):
    """Causal Hebbian (linear) attention with a float32 state S ∈ R^{K×V} per batch and head.

    strict:     o_t = scale · q_t S_{t-1},  S_t = γ S_{t-1} + k_tᵀ v_t   (BDH)
    inclusive:  o_t = scale · q_t S_t

    q, k [B,H,T,K]; v [B,H,T,V] or [B,1,T,V] (shared by all heads, never copied);
    decay None or [H] in (0, 1]; initial_state None or [B,H,K,V] float32.
    Returns (o [B,H,T,V] in v's dtype, S_final [B,H,K,V] float32 or None).
    Differentiable in q, k, v, initial_state and decay (every backend).

    Precision: "triton" runs float16 and float64 inputs in float32 (a float16 state overflows
    at 65504), and bf16 too under TRITON_INTERPRET (the interpreter mis-loads bf16). Under
    `torch.use_deterministic_algorithms(True)` it avoids the float32 atomics of the fused
    forward, so repeated calls give bitwise-equal outputs.

    launch: the Triton kernels' algorithm, chunks and tiles (`ChunkLaunch`); None takes the
    default for the shape (`plan.default_chunk_launch`). The other backends ignore it.
    """
    B, H, T, K, V = check_attention_inputs(q, k, v, decay, initial_state, chunk_size, scale)
    check_launch(launch, ChunkLaunch)
    kind = _resolve_backend(backend, q.device)
    if kind == "triton":
        from .function import hebbian_attention_triton
        o, S = hebbian_attention_triton(q, k, v, scale=scale, strict=strict, decay=decay,
                                        initial_state=initial_state,
                                        output_final_state=output_final_state,
                                        chunk_size=chunk_size, launch=launch)
        return o, S
    if kind == "dense":
        return dense.dense_hebbian(q, k, v, scale=scale, strict=strict, decay=decay,
                                   initial_state=initial_state,
                                   output_final_state=output_final_state)
    if kind == "torch":
        o, S = torch_chunk.chunk_hebbian_torch(q, k, v, scale=scale, strict=strict, decay=decay,
                                               initial_state=initial_state,
                                               chunk_size=chunk_size or 64)
    else:
        o, S = naive.hebbian_recurrent(q, k, v, scale=scale, strict=strict, decay=decay,
                                       initial_state=initial_state)
    if not output_final_state:
        return o, None
    S = S.float()
    # T = 0 leaves the state untouched: hand back a copy, never the caller's own tensor.
    return o, (S.clone() if S is initial_state else S)


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

"""One BDH decoding step on the sparse kernels (issue #15): only the active neurons are touched.

After training, xs is ~20% dense and xy ~2%, so at a decoding step

    a  = hebbian_step(RoPE(xs), RoPE(xs), x)   reads/writes only the state rows where RoPE(xs) ≠ 0
    y  = xy @ decoder                          reads only the decoder rows where xy ≠ 0

(`kernels.hebbian.sparse_step`); with a tileable N (BDH's 8192) the layer runs on the fused
kernels of `kernels.hebbian.decode_fused` (8 launches a layer instead of ~20; the unfused loop
below is its reference). Everything else — the encoder matvecs, RoPE, LayerNorms, the
head — is the dense step of `BDH._run` unchanged, in the same order, so the logits and the
states equal the dense step's up to float32 summation order. RoPE mixes the pairs (2i, 2i+1),
so the active set of RoPE(xs) is the union of active pairs of xs; the compaction runs on
RoPE(xs) itself, which is that set exactly. No host synchronisation on the "triton" path: the
active indices are compacted on the device into fixed-capacity buffers, so the step can be
captured in a CUDA graph (the RoPE position may be an int64 device tensor, as `DecodeGraph`
passes it).
"""
from __future__ import annotations

import torch

from kernels.checks import resolve_backend
from kernels.hebbian.common import INTERPRET
from kernels.hebbian.sparse_step import SPARSE_BACKENDS, sparse_hebbian_step, sparse_rows_matmul


def _check_inputs(model, idx, states, position, backend) -> None:
    from .model import BDH
    if not isinstance(model, BDH):
        raise TypeError(f"model: expected a bdh.BDH, got {type(model).__name__}")
    C = model.config
    device = model.encoder.device
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx: expected a tensor of token ids (int64) [B,1], got "
                        f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    if idx.dim() != 2 or idx.shape[1] != 1 or idx.shape[0] < 1:
        raise ValueError(f"idx: expected shape [B,1] (one token per sequence), "
                         f"got {list(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"idx: expected device {device} (the model's), got {idx.device}")
    B = idx.shape[0]
    if not isinstance(states, (list, tuple)) or len(states) != C.n_layer:
        got = (f"{len(states)} tensors" if isinstance(states, (list, tuple))
               else type(states).__name__)
        raise ValueError(f"states: expected a list of n_layer = {C.n_layer} float32 tensors "
                         f"[B,nh,N,D], got {got}")
    shape = [B, C.n_head, C.N, C.n_embd]
    for i, S in enumerate(states):
        if not isinstance(S, torch.Tensor) or S.dtype != torch.float32:
            raise TypeError(f"states[{i}]: expected a float32 tensor {shape}, got "
                            f"{S.dtype if isinstance(S, torch.Tensor) else type(S).__name__}")
        if list(S.shape) != shape:
            raise ValueError(f"states[{i}]: expected shape [B,nh,N,D] = {shape}, "
                             f"got {list(S.shape)}")
        if S.device != device or not S.is_contiguous():
            raise ValueError(f"states[{i}]: expected a contiguous tensor on {device} (updated "
                             f"in place), got one on {S.device}, contiguous={S.is_contiguous()}")
    if isinstance(position, torch.Tensor):
        if position.dtype != torch.int64 or position.numel() != 1:
            raise TypeError(f"position: expected an int or an int64 tensor [1], got "
                            f"{position.dtype} {list(position.shape)}")
    elif isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"position: expected an int >= 0 (the RoPE position of idx), "
                         f"got {position!r}")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"backend: expected one of {SPARSE_BACKENDS}, got {backend!r}")
    if (model.training and model.drop.p > 0) or model._probe is not None:
        raise ValueError("model: the sparse decoding step needs eval mode (or dropout 0) and no "
                         f"probe attached; got training={model.training}, "
                         f"dropout={model.drop.p}, probe={model._probe is not None}")


# {"fused": False} pins the unfused kernels (benchmarks time both in one process).
SPARSE_DECODE: dict = {}


def _fused_ok(model, kind: str, dtype: torch.dtype) -> bool:
    """The fused layer (kernels.hebbian.decode_fused) runs on the Triton backend when N has a
    power-of-two factor >= 16 (its tiles) and, under the interpreter, not in bf16."""
    N = model.config.N
    return (SPARSE_DECODE.get("fused", True) and kind == "triton" and (N & -N) >= 16
            and not (INTERPRET and dtype == torch.bfloat16))


def _fused_layer(model, x, S, pos, freqs64):
    """One layer on the fused kernels: x [B, D] in the model dtype → the next x [B, D]; S is
    updated in place. The same arithmetic as the unfused loop body below."""
    from kernels.hebbian.decode_fused import encode_gate, encode_rope, reduce_layernorm
    from kernels.hebbian.sparse_step import (compact_from_tiles, sparse_rows_partials,
                                             sparse_step_partials)
    B, D = x.shape
    nh, N = model.config.n_head, model.config.N
    eps = model.ln.eps
    xs_h, qk, tiles, BL = encode_rope(x, model.encoder, freqs64, pos)
    idx, count = compact_from_tiles(qk.view(B * nh, N), tiles, BL)
    part = sparse_step_partials(qk, qk, x.view(B, 1, D), S, idx, count, strict=True)
    a = reduce_layernorm(part, x.dtype, eps)                              # LN(o), [B·nh, D]
    xy, tiles, BL = encode_gate(a.view(B, nh, D), model.encoder_v, xs_h, BN=min(128, N & -N))
    idx, count = compact_from_tiles(xy, tiles, BL)
    part = sparse_rows_partials(xy, model.decoder, idx, count)
    return reduce_layernorm(part, x.dtype, eps, res=x)                   # LN(x + LN(y))


@torch.no_grad()
def sparse_decode_step(model, idx, states, position, *, backend: str = "auto"):
    """One decoding step of ``model`` (a `bdh.BDH`) on the sparse kernels.

    idx [B,1] token ids (not range-checked: that would sync with the device); states: the list
    of n_layer float32 tensors [B,nh,N,D] (`BDHState.layers`), updated in place; position: the
    RoPE position of idx, an int or an int64 device tensor [1]. backend: "triton" (the kernels;
    CUDA, or the CPU under TRITON_INTERPRET=1), "torch" (the reference loops), "auto".

    Equal to `model._run(idx, states, position, want_state=True, inplace=True,
    last_only=True)` in eval mode. Returns (logits [B,1,vocab], states)."""
    _check_inputs(model, idx, states, position, backend)
    C = model.config
    B = idx.shape[0]
    nh, N, D = C.n_head, C.N, C.n_embd
    x = model.ln(model.embed(idx.long()).unsqueeze(1))                    # [B,1,1,D]
    kind = resolve_backend(backend, idx.device, SPARSE_BACKENDS)
    if _fused_ok(model, kind, x.dtype):
        from kernels.rope import pair_freqs64
        pos = position if isinstance(position, torch.Tensor) else torch.tensor(
            [position], dtype=torch.int64, device=idx.device)
        freqs64 = pair_freqs64(N, idx.device)
        x2 = x.reshape(B, D).contiguous()
        for layer in range(C.n_layer):
            x2 = _fused_layer(model, x2, states[layer], pos, freqs64)
        return (x2 @ model.lm_head).view(B, 1, -1), states
    for layer in range(C.n_layer):
        S = states[layer]
        xh = x.reshape(1, B, D).expand(nh, B, D)                          # no copy
        xs_h = torch.bmm(xh, model.encoder).relu_()                       # [nh,B,N]
        xs = xs_h.view(nh, B, 1, N).transpose(0, 1)                       # [B,nh,1,N] view
        qk = model.attn.rotate(xs, position)[:, :, 0].contiguous()        # [B,nh,N]
        o, _ = sparse_hebbian_step(qk, qk, x[:, :, 0].to(qk.dtype), S, strict=True,
                                   backend=backend)                       # [B,nh,D]
        a_h = model.ln(o).transpose(0, 1).reshape(nh, B, D)
        ys_h = torch.bmm(a_h, model.encoder_v).relu_()                    # [nh,B,N]
        # xy as [B, nh·N]: neuron h·N + n is row h·N + n of the decoder
        xy = (xs_h * ys_h.to(xs_h.dtype)).transpose(0, 1).reshape(B, nh * N)
        y = sparse_rows_matmul(xy, model.decoder, backend=backend)        # [B,D]
        x = model.ln(x + model.ln(y.view(B, 1, 1, D)))
    logits = x.view(B, 1, D) @ model.lm_head
    return logits, states

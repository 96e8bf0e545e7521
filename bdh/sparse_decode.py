"""One BDH decoding step on the sparse kernels: only the active neurons are touched.

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
captured in a CUDA graph (the RoPE positions may be an int64 device tensor, as
`bdh.decode.BDHDecoder` passes them: one for the batch, or one per row).
"""
from __future__ import annotations

import dataclasses

import torch

from kernels.checks import resolve_backend
from kernels.hebbian.launches import (CompactLaunch, EncodeGateLaunch, EncodeRopeLaunch,
                                      ReduceLaunch, SparseStepLaunch)
from kernels.launch import INTERPRET, shape_class, with_tuned
from kernels.hebbian.sparse_step import SPARSE_BACKENDS, sparse_hebbian_step, sparse_rows_matmul


def _check_inputs(model, idx, states, position, backend, launch) -> None:
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
        if position.dtype != torch.int64 or position.dim() != 1 \
                or position.numel() not in (1, B):
            raise TypeError(f"position: expected an int or an int64 tensor [1] or [B] = [{B}] "
                            f"(one position per row), got {position.dtype} "
                            f"{list(position.shape)}")
        if position.device != device:
            raise ValueError(f"position: expected a tensor on {device}, got {position.device}")
    elif isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"position: expected an int >= 0 (the RoPE position of idx), "
                         f"got {position!r}")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"backend: expected one of {SPARSE_BACKENDS}, got {backend!r}")
    if launch is not None and not isinstance(launch, SparseDecodeLaunch):
        raise TypeError(f"launch: expected a SparseDecodeLaunch or None, got "
                        f"{type(launch).__name__}")
    if (model.training and model.drop.p > 0) or model._probe is not None:
        raise ValueError("model: the sparse decoding step needs eval mode (or dropout 0) and no "
                         f"probe attached; got training={model.training}, "
                         f"dropout={model.drop.p}, probe={model._probe is not None}")


@dataclasses.dataclass(frozen=True)
class SparseDecodeLaunch:
    """How the sparse decoding step launches its kernels (never what it computes), so a
    benchmark passes every choice per call. fused: the fused layer kernels
    (`kernels.hebbian.decode_fused`) where they apply; False runs the unfused sparse kernels.
    The kernel launches (None: each kernel's default for its shape, from the tuning cache):
    step / rows: the sparse Hebbian step and the sparse decoder product (`SparseStepLaunch`);
    compact, encode_rope, encode_gate, reduce: the fused layer's compaction, encoders and
    reduce + LayerNorm."""
    fused: bool = True
    step: SparseStepLaunch | None = None
    rows: SparseStepLaunch | None = None
    compact: CompactLaunch | None = None
    encode_rope: EncodeRopeLaunch | None = None
    encode_gate: EncodeGateLaunch | None = None
    reduce: ReduceLaunch | None = None

    def __post_init__(self):
        if not isinstance(self.fused, bool):
            raise TypeError(f"SparseDecodeLaunch.fused: expected True or False, got "
                            f"{self.fused!r}")
        kinds = {"step": SparseStepLaunch, "rows": SparseStepLaunch, "compact": CompactLaunch,
                 "encode_rope": EncodeRopeLaunch, "encode_gate": EncodeGateLaunch,
                 "reduce": ReduceLaunch}
        for name, cls in kinds.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"SparseDecodeLaunch.{name}: expected None or a "
                                f"{cls.__name__}, got {type(value).__name__}")


LAUNCH_OP = "bdh.sparse_decode"


def sparse_decode_launch(model, batch_size: int) -> SparseDecodeLaunch:
    """The default launch for ``model`` at ``batch_size``: the dataclass defaults with the
    per-GPU tuning cache's entry applied (`kernels.launch.with_tuned`)."""
    C = model.config
    shape = shape_class(B=batch_size, H=C.n_head, N=C.N, D=C.n_embd, dtype=model.encoder.dtype)
    return with_tuned(SparseDecodeLaunch(), LAUNCH_OP, model.encoder.device, shape)


def _fused_ok(model, kind: str, dtype: torch.dtype, launch: SparseDecodeLaunch | None = None,
              shared_position: bool = True) -> bool:
    """The fused layer (kernels.hebbian.decode_fused) runs on the Triton backend when N has a
    power-of-two factor >= 16 (its tiles), under the interpreter not in bf16, and when every
    row is at one position (its RoPE reads a single one)."""
    N = model.config.N
    return ((launch is None or launch.fused) and shared_position and kind == "triton"
            and (N & -N) >= 16 and not (INTERPRET and dtype == torch.bfloat16))


def _fused_layer(model, x, S, pos, freqs64, launch: SparseDecodeLaunch):
    """One layer on the fused kernels: x [B, D] in the model dtype → the next x [B, D]; S is
    updated in place. The same arithmetic as the unfused loop body below."""
    from kernels.hebbian.decode_fused import encode_gate, encode_rope, reduce_layernorm
    from kernels.hebbian.sparse_step import (compact_from_tiles, sparse_rows_partials,
                                             sparse_step_partials)
    B, D = x.shape
    nh, N = model.config.n_head, model.config.N
    eps = model.ln.eps
    warps = (launch.compact or CompactLaunch()).warps
    xs_h, qk, tiles, BL = encode_rope(x, model.encoder, freqs64, pos, launch=launch.encode_rope)
    idx, count = compact_from_tiles(qk.view(B * nh, N), tiles, BL, warps=warps)
    part = sparse_step_partials(qk, qk, x.view(B, 1, D), S, idx, count, strict=True,
                                launch=launch.step)
    a = reduce_layernorm(part, x.dtype, eps, launch=launch.reduce)        # LN(o), [B·nh, D]
    xy, tiles, BL = encode_gate(a.view(B, nh, D), model.encoder_v, xs_h,
                                launch=launch.encode_gate)
    idx, count = compact_from_tiles(xy, tiles, BL, warps=warps)
    part = sparse_rows_partials(xy, model.decoder, idx, count, launch=launch.rows)
    return reduce_layernorm(part, x.dtype, eps, res=x, launch=launch.reduce)  # LN(x + LN(y))


@torch.no_grad()
def sparse_decode_step(model, idx, states, position, *, backend: str = "auto",
                       launch: SparseDecodeLaunch | None = None):
    """One decoding step of ``model`` (a `bdh.BDH`) on the sparse kernels.

    idx [B,1] token ids (not range-checked: that would sync with the device); states: the list
    of n_layer float32 tensors [B,nh,N,D] (`BDHState.layers`), updated in place; position: the
    RoPE position of idx, an int or an int64 device tensor, [1] (every row) or [B] (one per
    row: streams at different positions). backend: "triton" (the kernels; CUDA, or the CPU
    under TRITON_INTERPRET=1), "torch" (the reference loops), "auto". launch: a
    `SparseDecodeLaunch` (None: `sparse_decode_launch(model, B)`). The fused layer kernels
    take one position for the batch, so per-row positions run the unfused kernels.

    Equal to `model._run(idx, states, position, want_state=True, inplace=True,
    last_only=True)` in eval mode. Returns (logits [B,1,vocab], states)."""
    _check_inputs(model, idx, states, position, backend, launch)
    C = model.config
    B = idx.shape[0]
    nh, N, D = C.n_head, C.N, C.n_embd
    if launch is None:
        launch = sparse_decode_launch(model, B)
    x = model.ln(model.embed(idx.long()).unsqueeze(1))                    # [B,1,1,D]
    kind = resolve_backend(backend, idx.device, SPARSE_BACKENDS)
    shared = not isinstance(position, torch.Tensor) or position.numel() == 1
    if _fused_ok(model, kind, x.dtype, launch, shared):
        from kernels.rope import pair_freqs64
        pos = position if isinstance(position, torch.Tensor) else torch.tensor(
            [position], dtype=torch.int64, device=idx.device)
        freqs64 = pair_freqs64(N, idx.device)
        x2 = x.reshape(B, D).contiguous()
        for layer in range(C.n_layer):
            x2 = _fused_layer(model, x2, states[layer], pos, freqs64, launch)
        return (x2 @ model.lm_head).view(B, 1, -1), states
    for layer in range(C.n_layer):
        S = states[layer]
        xh = x.reshape(1, B, D).expand(nh, B, D)                          # no copy
        xs_h = torch.bmm(xh, model.encoder).relu_()                       # [nh,B,N]
        xs = xs_h.view(nh, B, 1, N).transpose(0, 1)                       # [B,nh,1,N] view
        qk = model.attn.rotate(xs, position)[:, :, 0].contiguous()        # [B,nh,N]
        o, _ = sparse_hebbian_step(qk, qk, x[:, :, 0].to(qk.dtype), S, strict=True,
                                   backend=backend, launch=launch.step)   # [B,nh,D]
        a_h = model.ln(o).transpose(0, 1).reshape(nh, B, D)
        ys_h = torch.bmm(a_h, model.encoder_v).relu_()                    # [nh,B,N]
        # xy as [B, nh·N]: neuron h·N + n is row h·N + n of the decoder
        xy = (xs_h * ys_h.to(xs_h.dtype)).transpose(0, 1).reshape(B, nh * N)
        y = sparse_rows_matmul(xy, model.decoder, backend=backend,
                               launch=launch.rows)                        # [B,D]
        x = model.ln(x + model.ln(y.view(B, 1, 1, D)))
    logits = x.view(B, 1, D) @ model.lm_head
    return logits, states

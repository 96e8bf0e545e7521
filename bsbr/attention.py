"""BSBR attention as a drop-in module: x [B,T,D] → y [B,T,D], causal, streamable.

Per head, chunk size C, c(t) = ⌊t/C⌋ in absolute positions:

    q, k, v = x W_q, x W_k, x W_v            (head dim K = V = d_model / n_head)
    r, hk   = x W_r, x W_h                   (meta query, meta-key source; meta_dim M)
    local_t = softmax over keys s ≤ t of t's chunk of q_t·k_s / √K, applied to v
    long_t  = λ q_t Σ_j p_tj F_j,  F_j = Σ_{s∈j} k_sᵀ v_s,  h_j = mean_{s∈j} hk_s,
              p_t = softmax over completed chunks j < c(t) of r_t·h_j / √M (top_k of them if set)
    y_t     = W_o [local_t + long_t]

λ (`long_scale`) defaults to scale / C (scale = 1/√K): a routed chunk then adds the chunk-mean
of (scale · q_t·k_s) v_s, the size of one softmax logit times a value. The plain formula
is λ = 1 (`long_scale=1.0`); its unnormalised sum over C keys swamps the local softmax: at
initialisation (d_model 128, 2 heads, C = 64, T = 256) the long term's std was 70× the local
term's (11.1 against 0.16). Measured (CPU, `python -m experiments.quality`, 600 steps): the BSBR
LM's validation loss 2.41 with the default against 2.77 with λ = 1. The same default as
`bsbr.hf` (where λ = 1 took a converted GPT-2 from 2.58 to 4.88 val loss). λ is the kernels'
`long_scale` argument (it scales the routed term only, not the local softmax or the
routing), so the bank holds plain F_j.

The maths runs in `kernels.bsbr` through `bsbr.stream` (one call per piece; a single token
decodes as local attention over the partial chunk plus `routed_readout_step` over the bank).
The streaming state (`BSBRState`) holds the bank of completed chunks and the partial chunk's
k, v, hk; feeding a
sequence in pieces (any cut points) equals one call, exactly up to float rounding, with the
exact bank (bank=None) or a bounded bank that has not yet merged anything. Past a bounded
bank's level-0 capacity the bank approximates: a query then routes over merged / archived
slots, while in a single call the chunks of that call are still routed exactly, so the outputs
depend on where the sequence was cut (the documented exception of the streaming contract).
"""
from __future__ import annotations

import torch
from torch import nn

from glassbrain.checks import check_int, check_optional_int, check_sequence

from .config import BACKENDS, BankConfig, bank_from, check_long_scale, resolve_long_scale
from .state import BSBRState
from .stream import StreamSpec, bsbr_stream, empty_state


class BSBRAttention(nn.Module):
    """Causal BSBR attention with a (hierarchical) state bank. See the module docstring."""

    def __init__(self, d_model: int, n_head: int, chunk_size: int, top_k: int | None = None,
                 bank: BankConfig | None = None, meta_dim: int | None = None, *,
                 backend: str = "auto", scale: float | None = None,
                 long_scale: float | None = None, bias: bool = False):
        """x [B,T,d_model] → y [B,T,d_model], causal; ``attn(x, state=..., return_state=True)``
        streams.

        d_model, n_head: the width D and the heads (D a multiple of n_head; head dim
            K = D / n_head).
        chunk_size: C >= 1, the chunk of the local softmax and of the bank's states.
        top_k: None (dense routing over every completed chunk) or the chunks each token reads.
        bank: None (the exact bank: one slot per completed chunk, growing), a `BankConfig`, a
            dict of its fields or a tuple of slots per level (the bounded hierarchical bank).
        meta_dim: M, the width of the routing query r and meta key source hk (default K).
        backend: a kernels.bsbr backend ("auto", "triton", "torch", "reference").
        scale: the local softmax scale (default 1/√K).
        long_scale: λ of the routed term (default scale / C; 1.0 is the plain sum).
        bias: biases on the six projections W_q, W_k, W_v, W_r, W_h, W_o.
        """
        super().__init__()
        check_int("BSBRAttention: d_model", d_model, 1)
        check_int("BSBRAttention: n_head", n_head, 1)
        if d_model % n_head:
            raise ValueError(f"BSBRAttention: d_model: expected a multiple of n_head = {n_head}, "
                             f"got {d_model}")
        check_int("BSBRAttention: chunk_size", chunk_size, 1)
        check_optional_int("BSBRAttention: top_k", top_k, 1)
        check_optional_int("BSBRAttention: meta_dim", meta_dim, 1)
        if backend not in BACKENDS:
            raise ValueError(f"BSBRAttention: backend: expected one of {BACKENDS}, "
                             f"got {backend!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not scale > 0):
            raise ValueError(f"BSBRAttention: scale: expected None or a number > 0, "
                             f"got {scale!r}")
        self.d_model, self.n_head, self.chunk_size, self.top_k = d_model, n_head, chunk_size, top_k
        self.head_dim = d_model // n_head
        self.meta_dim = self.head_dim if meta_dim is None else meta_dim
        self.bank = bank_from(bank)
        check_long_scale(long_scale, "BSBRAttention: long_scale")
        self.backend = backend
        self.scale = (d_model // n_head) ** -0.5 if scale is None else scale     # resolved
        self.long_scale = resolve_long_scale(long_scale, self.scale, chunk_size)
        HM = n_head * self.meta_dim
        self.W_q = nn.Linear(d_model, d_model, bias=bias)
        self.W_k = nn.Linear(d_model, d_model, bias=bias)
        self.W_v = nn.Linear(d_model, d_model, bias=bias)
        self.W_r = nn.Linear(d_model, HM, bias=bias)
        self.W_h = nn.Linear(d_model, HM, bias=bias)
        self.W_o = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_head={self.n_head}, chunk_size={self.chunk_size}, "
                f"top_k={self.top_k}, meta_dim={self.meta_dim}, bank={self.bank}, "
                f"long_scale={self.long_scale:.3g}, backend={self.backend!r}")

    @property
    def spec(self) -> StreamSpec:
        """What `bsbr.stream` computes for this module."""
        return StreamSpec(self.chunk_size, self.scale, self.long_scale, self.top_k, self.bank,
                          self.backend)

    # ----------------------------------------------------------------- state

    def state_config(self) -> dict:
        return {"module": "BSBRAttention", "d_model": self.d_model, "n_head": self.n_head,
                "meta_dim": self.meta_dim, "chunk_size": self.chunk_size,
                "bank": None if self.bank is None else self.bank.as_dict()}

    def init_state(self, batch_size: int, device=None, dtype=None) -> BSBRState:
        """The empty history for ``batch_size`` sequences (partial-chunk buffers in ``dtype``,
        default the weights'; bank states float32, float64 for float64 weights)."""
        check_int("batch_size", batch_size, 1)
        device = self.W_q.weight.device if device is None else device
        dtype = self.W_q.weight.dtype if dtype is None else dtype
        K = self.head_dim
        return empty_state(batch_size, self.n_head, K, K, self.meta_dim, self.spec,
                           device=device, dtype=dtype, config=self.state_config())

    def check_state(self, state, batch_size: int | None = None) -> None:
        """Raise a clear error unless ``state`` came from a module of this configuration, for
        ``batch_size`` sequences, on this module's device."""
        if not isinstance(state, BSBRState):
            raise TypeError(f"state: expected a BSBRState or None, got {type(state).__name__}")
        mine = self.state_config()
        if state.config is not None and dict(state.config) != mine:
            diff = ", ".join(f"{k}: state has {state.config.get(k)!r}, module has {mine.get(k)!r}"
                             for k in sorted(set(state.config) | set(mine))
                             if state.config.get(k) != mine.get(k))
            raise ValueError(f"state: made by a different configuration than this "
                             f"BSBRAttention ({diff})")
        H, K, M, C = self.n_head, self.head_dim, self.meta_dim, self.chunk_size
        if state.hk is None:
            raise ValueError("state: has no meta-key buffer (made for the transformers drop-in "
                             "or RecurrentMultiheadAttention, where hk = k), not by a "
                             "BSBRAttention")
        if tuple(state.k.shape[1:]) != (H, C - 1, K) \
                or tuple(state.hk.shape[1:]) != (H, C - 1, M):
            raise ValueError(f"state.k / state.hk: expected [B,{H},{C - 1},{K}] / "
                             f"[B,{H},{C - 1},{M}], got {list(state.k.shape)} / "
                             f"{list(state.hk.shape)}")
        if batch_size is not None and state.batch_size != batch_size:
            raise ValueError(f"state: expected a state of batch size {batch_size} (the input's), "
                             f"got batch size {state.batch_size}")
        device = self.W_q.weight.device
        if state.device != device:
            raise ValueError(f"state: expected device {device}, got {state.device} "
                             f"(move it with state.to(device))")

    # ----------------------------------------------------------------- forward

    def _check_x(self, x) -> None:
        check_sequence(x, self.d_model)
        if x.shape[0] == 0:
            raise ValueError(f"x: expected B >= 1 and T >= 1, got shape {list(x.shape)}")

    def _heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, dim).transpose(1, 2)          # [B,H,T,dim]

    def forward(self, x: torch.Tensor, state: BSBRState | None = None,
                return_state: bool = False):
        """y = attn(x); y, state = attn(x, state=None, return_state=True). The state passed in
        is not modified."""
        self._check_x(x)
        B = x.shape[0]
        if state is not None:
            self.check_state(state, B)
        elif return_state:
            state = self.init_state(B, device=x.device)
        K, M = self.head_dim, self.meta_dim
        q, k, v = (self._heads(W(x), K) for W in (self.W_q, self.W_k, self.W_v))
        r, hk = self._heads(self.W_r(x), M), self._heads(self.W_h(x), M)
        o, state = bsbr_stream(q, k, v, state, self.spec, r=r, hk=hk,
                               keep_state=return_state)
        y = self.W_o(o.transpose(1, 2).reshape(x.shape))
        return (y, state) if return_state else y

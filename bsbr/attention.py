"""BSBR attention as a drop-in module: x [B,T,D] → y [B,T,D], causal, streamable.

Per head (DESIGN.md "BSBR, made causal"), chunk size C, c(t) = ⌊t/C⌋ in absolute positions:

    q, k, v = x W_q, x W_k, x W_v            (head dim K = V = d_model / n_head)
    r, hk   = x W_r, x W_h                   (meta query, meta-key source; meta_dim M)
    local_t = softmax over keys s ≤ t of t's chunk of q_t·k_s / √K, applied to v
    long_t  = λ q_t Σ_j p_tj F_j,  F_j = Σ_{s∈j} k_sᵀ v_s,  h_j = mean_{s∈j} hk_s,
              p_t = softmax over completed chunks j < c(t) of r_t·h_j / √M (top_k of them if set)
    y_t     = W_o [local_t + long_t]

λ (`long_scale`) defaults to scale / C (scale = 1/√K): a routed chunk then adds the chunk-mean
of (scale · q_t·k_s) v_s, the size of one softmax logit times a value. DESIGN.md's plain formula
is λ = 1 (`long_scale=1.0`); its unnormalised sum over C keys swamps the local softmax: at
initialisation (d_model 128, 2 heads, C = 64, T = 256) the long term's std was 70× the local
term's (11.1 against 0.16). Measured (CPU, `python -m experiments.quality`, 600 steps): the BSBR
LM's validation loss 2.41 with the default against 2.77 with λ = 1. The same default as
`bsbr.hf` (where λ = 1 took a converted GPT-2 from 2.58 to 4.88 val loss). λ is the kernels'
`long_scale` argument (it scales the routed term only, not the local softmax or the
routing), so the bank holds plain F_j.

The maths runs in `kernels.bsbr` (one call per piece; a single token decodes as local attention
over the partial chunk plus `routed_readout_step` over the bank). The streaming state
(`BSBRState`) holds the bank of completed chunks and the partial chunk's k, v, hk; feeding a
sequence in pieces (any cut points) equals one call, exactly up to float rounding, with the
exact bank (bank=None) or a bounded bank that has not yet merged anything. Past a bounded
bank's level-0 capacity the bank approximates: a query then routes over merged / archived
slots, while in a single call the chunks of that call are still routed exactly, so the outputs
depend on where the sequence was cut (the documented exception of the streaming contract).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import bsbr as kb
from glassbrain.checks import check_sequence

from .bank import empty_bank, push_chunks, update_salience
from .config import (BACKENDS, BankConfig, bank_from, check_int, check_long_scale,
                     check_optional_int, resolve_long_scale)
from .state import BSBRState


class BSBRAttention(nn.Module):
    """Causal BSBR attention with a (hierarchical) state bank. See the module docstring.

    d_model, n_head: D and heads (D divisible by n_head); chunk_size: C >= 1; top_k: None
    (dense routing over all completed chunks) or >= 1; bank: None (exact, unbounded), a
    `BankConfig`, a dict of its fields or a tuple of slots per level; meta_dim: M (default the
    head dim); scale: local softmax scale (default 1/√K); long_scale: λ of the routed term
    (default scale / chunk_size; 1.0 is DESIGN.md's plain sum); backend: kernels.bsbr backend.
    """

    def __init__(self, d_model: int, n_head: int, chunk_size: int, top_k: int | None = None,
                 bank: BankConfig | None = None, meta_dim: int | None = None, *,
                 backend: str = "auto", scale: float | None = None,
                 long_scale: float | None = None, bias: bool = False):
        super().__init__()
        own = "BSBRAttention: "
        check_int(own, "d_model", d_model, 1)
        check_int(own, "n_head", n_head, 1)
        if d_model % n_head:
            raise ValueError(f"BSBRAttention: d_model: expected a multiple of n_head = {n_head}, "
                             f"got {d_model}")
        check_int(own, "chunk_size", chunk_size, 1)
        check_optional_int(own, "top_k", top_k, 1)
        check_optional_int(own, "meta_dim", meta_dim, 1)
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

    # ----------------------------------------------------------------- state

    def state_config(self) -> dict:
        return {"module": "BSBRAttention", "d_model": self.d_model, "n_head": self.n_head,
                "meta_dim": self.meta_dim, "chunk_size": self.chunk_size,
                "bank": None if self.bank is None else self.bank.as_dict()}

    def init_state(self, batch_size: int, device=None, dtype=None) -> BSBRState:
        """The empty history for ``batch_size`` sequences (partial-chunk buffers in ``dtype``,
        default the weights'; bank states float32, float64 for float64 weights)."""
        check_int("", "batch_size", batch_size, 1)
        device = self.W_q.weight.device if device is None else device
        dtype = self.W_q.weight.dtype if dtype is None else dtype
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        H, K, M, C = self.n_head, self.head_dim, self.meta_dim, self.chunk_size
        bank = empty_bank(batch_size, H, K, K, M, self.bank, device=device, dtype=sd)
        buf = dict(device=device, dtype=dtype)
        return BSBRState(bank, torch.zeros(batch_size, H, C - 1, K, **buf),
                         torch.zeros(batch_size, H, C - 1, K, **buf),
                         torch.zeros(batch_size, H, C - 1, M, **buf), 0, self.state_config())

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
        if tuple(state.k.shape[1:]) != (H, C - 1, K) or tuple(state.hk.shape[1:]) != (H, C - 1, M):
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
        B, T, D = x.shape
        if state is not None:
            self.check_state(state, B)
        elif return_state:
            state = self.init_state(B, device=x.device)
        K, M = self.head_dim, self.meta_dim
        q, k, v = (self._heads(W(x), K) for W in (self.W_q, self.W_k, self.W_v))
        r, hk = self._heads(self.W_r(x), M), self._heads(self.W_h(x), M)

        fill = 0 if state is None else state.fill
        bank_F = bank_h = None
        if fill:
            pk, pv, phk = state.partial()
            k = torch.cat([pk.to(k.dtype), k], 2)
            v = torch.cat([pv.to(v.dtype), v], 2)
            hk = torch.cat([phk.to(hk.dtype), hk], 2)
        if state is not None:
            bank_F, bank_h, _ = state.bank.valid()
        want_weights = return_state and self.bank is not None and bank_F is not None
        o, slot_weights = self._attend(q, k, v, r, hk, fill, bank_F, bank_h, want_weights)
        y = self.W_o(o.transpose(1, 2).reshape(B, T, D))
        if not return_state:
            return y
        return y, self._advance(state, k, v, hk, fill + T, slot_weights, T)

    def _attend(self, q, k, v, r, hk, fill, bank_F, bank_h, want_weights):
        """(o [B,H,T,V], slot_weights [B,H,n] or None) from the kernels; o = local + λ q Σ p F."""
        C, T = self.chunk_size, q.shape[2]
        lam, scale = self.long_scale, self.scale
        if T == 1 and bank_F is not None:
            # Decode: the token's chunk is the partial one, and every completed chunk is in the
            # bank, so local attention over the partial chunk plus a routed readout of the bank
            # is the whole answer; nothing before the partial chunk is re-run.
            local = kb.chunk_local_attention(q, k, v, chunk_size=C, offset=fill,
                                             scale=scale, backend=self.backend)
            long, w = kb.routed_readout_step(q[:, :, 0], r[:, :, 0], bank_F, bank_h, self.top_k,
                                             long_scale=lam)
            return local + long.unsqueeze(2).to(local.dtype), (w if want_weights else None)
        out = kb.bsbr_attention(q, k, v, r, hk, chunk_size=C, top_k=self.top_k,
                                scale=scale, offset=fill, bank_F=bank_F, bank_h=bank_h,
                                return_slot_weights=want_weights, long_scale=lam,
                                backend=self.backend)
        return out if want_weights else (out, None)

    def _advance(self, state: BSBRState, k, v, hk, n_keys: int, slot_weights,
                 n_queries: int) -> BSBRState:
        """The state after this call: salience updated, the call's completed chunks pushed into
        the bank, the remainder kept as the new partial chunk. k, v, hk hold the n_keys keys of
        this call (the old partial chunk's first)."""
        C = self.chunk_size
        bank = update_salience(state.bank, slot_weights, n_queries, self.bank)
        done = (n_keys // C) * C
        if done:
            F_new, h_new = kb.chunk_states(k[:, :, :done], v[:, :, :done], hk[:, :, :done],
                                           chunk_size=C)
            bank = push_chunks(bank, F_new, h_new, self.bank)
        rest = n_keys - done

        def keep(t, buf):
            tail = t[:, :, done:].to(buf.dtype)
            pad = buf.new_zeros(*buf.shape[:2], C - 1 - rest, buf.shape[3])
            return torch.cat([tail, pad], 2)

        return BSBRState(bank, keep(k, state.k), keep(v, state.v), keep(hk, state.hk),
                         state.position + n_queries, self.state_config())

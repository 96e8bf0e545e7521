"""BDH's attention: RoPE on the neuron axis + strictly causal Hebbian attention.

`HebbianRoPE` is the attention core shared by the BDH model (`BDH.attn`, which must hold the
official `freqs` buffer) and by the drop-in module `BDHAttention`:

    a = hebbian(q = RoPE(xs), k = RoPE(xs), v, strict, scale 1)      xs [B,nh,T,N], v [B,1,T,D]

RoPE is applied once and the same tensor is passed as q and k (no second copy). With a state
S the sequence continues at RoPE position `position`; a single token with no autograd takes the
decoding path `kernels.hebbian_step`; a "dense" piece with no state in or out (training at
T = 512 on CUDA) the fused q = k Function `kernels.rope.rope_dense_attention`; everything
else `kernels.hebbian_attention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import hebbian_attention, hebbian_step
from glassbrain.checks import check_sequence

from .config import ATTENTION_BACKENDS
from kernels.rope import official_freqs, rope_dense_attention, rotate_at, rotate_neurons
from .state import BDHState, advance_position


class HebbianRoPE(nn.Module):
    """RoPE(xs) as q = k, then strictly causal Hebbian attention with a v shared by all heads.

    The buffer `freqs` (1,1,1,N) holds the official float32 frequencies so that official
    state_dicts load unchanged; the phases themselves are computed from the exact formula in
    float64 (see `kernels.rope`), which also keeps them right after `model.to(torch.bfloat16)`.
    """

    def __init__(self, N: int, rope: bool = True):
        super().__init__()
        if N % 2:
            raise ValueError(f"N: RoPE rotates neuron pairs, so N must be even, got {N}")
        self.N, self.rope = N, rope
        self.freqs = nn.Buffer(official_freqs(N, torch.float32).view(1, 1, 1, N))

    def rotate(self, xs: torch.Tensor, position=0) -> torch.Tensor:
        """RoPE from ``position``: an int, a tuple of ints (one per row of xs: streams at
        different positions), or (decoding under a CUDA graph) an int64 device tensor [1] or
        [B]. Without rope (an ablation, not BDH): xs itself."""
        if not self.rope:
            return xs
        if isinstance(position, torch.Tensor):
            return rotate_at(xs, position)
        return rotate_neurons(xs, position)

    def forward(self, xs, v, *, position=0, state=None, output_final_state=False,
                step=False, backend="auto", chunk_size=None, dense_max_tokens=1024,
                recompute=False, step_launch=None, qs=None):
        """xs [B,nh,T,N], v [B,1,T,D]; state None or [B,nh,N,D] float32. qs: None (BDH: the
        query is the key, RoPE(xs)) or the query neurons [B,nh,T,N] of an untied query (an
        ablation, not BDH): q = RoPE(qs), k = RoPE(xs).

        step=True (T == 1, a state, no autograd) runs `hebbian_step` (its launch:
        ``step_launch``, a `kernels.StepLaunch` or None), which updates ``state`` in place:
        callers that must keep their state pass a clone.
        Returns (a [B,nh,T,D] in xs's dtype, final state or None)."""
        if step:
            qk = self.rotate(xs, position)
            q = qk if qs is None else self.rotate(qs, position)
            v = v.to(qk.dtype)
            o, S = hebbian_step(q[:, :, 0], qk[:, :, 0], v[:, :, 0], state, strict=True,
                                backend=backend, launch=step_launch)
            return o.unsqueeze(2), S
        if backend == "auto" and xs.is_cuda:
            backend = "dense" if xs.shape[2] <= dense_max_tokens else "triton"
        if backend == "dense" and state is None and not output_final_state and self.rope \
                and qs is None:
            # Training / plain forward of a short piece: the fused q = k form (saves xs, not
            # RoPE(xs); one product for dq + dk). It always recomputes RoPE in the backward.
            return rope_dense_attention(xs, v, position), None

        def attend(xs, v, state, qs):
            qk = self.rotate(xs, position)
            q = qk if qs is None else self.rotate(qs, position)
            return hebbian_attention(q, qk, v.to(qk.dtype), scale=1.0, strict=True,
                                     initial_state=state, output_final_state=output_final_state,
                                     chunk_size=chunk_size, backend=backend)

        if recompute and torch.is_grad_enabled():
            # Keep only xs (needed anyway for xy): RoPE and attention run again in the backward.
            return checkpoint(attend, xs, v, state, qs, use_reentrant=False)
        return attend(xs, v, state, qs)


class BDHAttention(nn.Module):
    """BDH's Hebbian attention as a drop-in attention layer: x [B,T,D] → y [B,T,D], causal.

        xs = relu(x @ encoder)                         [B,nh,T,N]  encoder [nh,D,N]
        a  = hebbian(RoPE(xs), RoPE(xs), v = x)        [B,nh,T,D]  strict: t sees only s < t
        y  = concat_h LN(a_h) @ out_proj               [B,T,D]     LN per head, no affine

    This is BDH's attention half (its encoder, RoPE and strict Hebbian state, v = x shared by
    the heads, no scale) without the sparse `encoder_v`/`decoder` MLP half, which belongs to
    the surrounding block. LN per head (as BDH does before `encoder_v`) keeps the output scale
    independent of how many tokens the state has summed; the learned projection mixes heads.
    Strictness means y_0 = 0 (the first token has no past): use it inside a residual block.

    Streaming: `y, state = attn(x, state=None, return_state=True)`; feeding the pieces of a
    sequence in turn equals one call. The state is a `BDHState` with a single [B,nh,N,D]
    float32 tensor; its size is independent of the context length.

    n_neurons: N per head; default 16·d_model/n_head (total neurons 16·d_model).
    rope: False drops RoPE (q = k = xs): an ablation for recall experiments, not BDH.
    query_encoder: True unties the query from the key (an ablation, not BDH): a second encoder
    gives qs = relu(x @ encoder_q) and q = RoPE(qs), while k = RoPE(xs) as before, so a query
    can select other features of its token than the ones its key stored.
    value_proj: True gives v = x @ W_v (D×D, shared by the heads) instead of v = x (an ablation,
    not BDH). Either option keeps the state's shape; both are off by default.
    """

    def __init__(self, d_model: int, n_head: int = 4, n_neurons: int | None = None, *,
                 backend: str = "auto", chunk_size: int | None = None, rope: bool = True,
                 query_encoder: bool = False, value_proj: bool = False):
        super().__init__()
        for name, val in (("d_model", d_model), ("n_head", n_head)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
        for name, val in (("rope", rope), ("query_encoder", query_encoder),
                          ("value_proj", value_proj)):
            if not isinstance(val, bool):
                raise ValueError(f"{name}: expected True or False, got {val!r}")
        N = 16 * d_model // n_head if n_neurons is None else n_neurons
        if isinstance(N, bool) or not isinstance(N, int) or N < 2 or N % 2:
            raise ValueError(f"n_neurons: expected an even int >= 2, got {N!r}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.d_model, self.n_head, self.N = d_model, n_head, N
        self.backend, self.chunk_size = backend, chunk_size
        self.encoder = nn.Parameter(torch.empty(n_head, d_model, N).normal_(std=0.02))
        self.encoder_q = (nn.Parameter(torch.empty(n_head, d_model, N).normal_(std=0.02))
                          if query_encoder else None)
        self.W_v = nn.Linear(d_model, d_model, bias=False) if value_proj else None
        self.attn = HebbianRoPE(N, rope)
        self.out_proj = nn.Linear(n_head * d_model, d_model, bias=False)
        nn.init.normal_(self.out_proj.weight, std=0.02 / math.sqrt(n_head))

    def state_config(self) -> dict:
        cfg = {"model": "BDHAttention", "d_model": self.d_model, "n_head": self.n_head,
               "N": self.N}
        if not self.attn.rope:          # only then: states saved before the option still load
            cfg["rope"] = False
        if self.encoder_q is not None:
            cfg["query_encoder"] = True
        if self.W_v is not None:
            cfg["value_proj"] = True
        return cfg

    def init_state(self, batch_size: int, device=None) -> BDHState:
        device = self.encoder.device if device is None else device
        return BDHState.zeros(1, batch_size, self.n_head, self.N, self.d_model, device=device,
                              config=self.state_config())

    def check_state(self, state, batch_size: int | None = None) -> None:
        if not isinstance(state, BDHState):
            raise TypeError(f"state: expected a BDHState or None, got {type(state).__name__}")
        state.check(self.state_config(), 1, (batch_size, self.n_head, self.N, self.d_model),
                    self.encoder.device, owner="BDHAttention")

    def forward(self, x: torch.Tensor, state: BDHState | None = None, return_state: bool = False):
        check_sequence(x, self.d_model)
        B, T, D = x.shape
        S, position = None, 0
        if state is not None:
            self.check_state(state, B)
            S, position = state.layers[0], state.position
        elif return_state:
            S = torch.zeros(B, self.n_head, self.N, D, dtype=torch.float32, device=x.device)
        step = T == 1 and S is not None and not torch.is_grad_enabled()
        if step:
            S = S.clone()   # hebbian_step updates in place; the caller's state stays as it was
        x1 = x.unsqueeze(1)                                        # [B,1,T,D]
        xs = torch.relu(x1 @ self.encoder)                         # [B,nh,T,N]
        qs = None if self.encoder_q is None else torch.relu(x1 @ self.encoder_q)
        v = x1 if self.W_v is None else self.W_v(x1)
        a, S_new = self.attn(xs, v, position=position, state=S, output_final_state=return_state,
                             step=step, backend=self.backend, chunk_size=self.chunk_size, qs=qs)
        a = F.layer_norm(a, (D,))
        y = self.out_proj(a.transpose(1, 2).reshape(B, T, self.n_head * D))
        if not return_state:
            return y
        return y, BDHState([S_new], advance_position(position, T), self.state_config())

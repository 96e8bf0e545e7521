"""DeltaNet (Schlag et al. 2021; Yang et al. 2024) on the streaming protocol.

    k_t ← k_t / ‖k_t‖,  q_t ← q_t / ‖q_t‖         (L2 per head: keeps the delta update stable)
    β_t = sigmoid(x_t W_β)                          (one write strength per head and token)
    S_t = S_{t-1} + β_t k_tᵀ (v_t − k_t S_{t-1})    o_t = q_t S_t

The sequence path is `kernels.deltanet.delta_rule` (fla's chunk_delta_rule on CUDA when fla is
installed, else our chunked WY / UT-transform form); decoding one token is `delta_rule_step`.
The state is S [B,H,d,d] float32, whatever the context length.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.deltanet import BACKENDS, delta_rule, delta_rule_step

from .projected import ProjectedAttention
from .state import RecurrentState, check_state


class DeltaNetAttention(ProjectedAttention):
    """x [B,T,D] → y [B,T,D]; state: `RecurrentState` with S [B,H,d,d] float32."""

    def __init__(self, d_model: int, n_head: int = 4, *, backend: str = "auto",
                 chunk_size: int | None = None, bias: bool = False):
        super().__init__(d_model, n_head, bias=bias)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend, self.chunk_size = backend, chunk_size
        self.beta_proj = nn.Linear(d_model, n_head, bias=True)
        nn.init.normal_(self.beta_proj.weight, std=1.0 / math.sqrt(d_model))
        nn.init.zeros_(self.beta_proj.bias)

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None,
                return_state: bool = False):
        self.check_x(x)
        B, T, _ = x.shape
        d = self.head_dim
        S, position = None, 0
        if state is not None:
            check_state(state, RecurrentState, "DeltaNetAttention", B, (self.n_head, d, d),
                        x.device)
            S, position = state.S, state.position
        q, k, v = self.qkv(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)                # [B,H,T]
        if T == 1 and S is not None and not torch.is_grad_enabled():
            o, S_new = delta_rule_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], beta[:, :, 0], S)
            o = o.unsqueeze(2)
        else:
            o, S_new = delta_rule(q, k, v, beta, initial_state=S,
                                  output_final_state=return_state,
                                  chunk_size=self.chunk_size, backend=self.backend)
        y = self.merge_heads(o.to(x.dtype))
        if not return_state:
            return y
        return y, RecurrentState(S_new.float() if S_new.dtype != torch.float64 else S_new,
                                 position + T)

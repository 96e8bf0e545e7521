"""Linear attention (Katharopoulos et al., "Transformers are RNNs") on the Hebbian kernel.

    φ(x) = elu(x) + 1 > 0
    o_t  = φ(q_t) S_t / (φ(q_t) z_t + eps),   S_t = Σ_{s≤t} φ(k_s)ᵀ v_s,   z_t = Σ_{s≤t} φ(k_s)ᵀ

The op is `kernels.normalised_hebbian_attention` (the normaliser z rides in the same kernel call
as an extra ones-column of v): the chunked kernel for a sequence, the step kernel for one token.
The state is that [B,H,d,d+1] float32 matrix: its size does not depend on the context.
"""
from __future__ import annotations

import torch

from kernels import check_normalised_options, normalised_hebbian_attention

from .projected import ProjectedAttention
from .state import RecurrentState, check_state


class LinearAttention(ProjectedAttention):
    """x [B,T,D] → y [B,T,D]; state: `RecurrentState` with S [B,H,d,d+1] float32."""

    def __init__(self, d_model: int, n_head: int = 4, *, eps: float = 1e-6,
                 backend: str = "auto", chunk_size: int | None = None, bias: bool = False):
        """Normalised elu+1 linear attention over ``n_head`` heads of d = d_model / n_head.

        eps: the denominator guard, a finite number > 0.
        backend: a kernels.hebbian backend ("auto", "triton", "torch", "dense", "reference").
        chunk_size: None (the kernel's default) or a power of two in [16, 128].
        bias: biases on the q, k, v and output projections.
        """
        super().__init__(d_model, n_head, bias=bias)
        check_normalised_options("elu", eps, chunk_size, backend)
        self.eps, self.backend, self.chunk_size = eps, backend, chunk_size

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None,
                return_state: bool = False):
        self.check_x(x)
        B, T, _ = x.shape
        d = self.head_dim
        S, position = None, 0
        if state is not None:
            check_state(state, RecurrentState, "LinearAttention", B, (self.n_head, d, d + 1),
                        x.device)
            S, position = state.S, state.position
        q, k, v = self.qkv(x)
        o, S_new = normalised_hebbian_attention(q, k, v, S, eps=self.eps,
                                                chunk_size=self.chunk_size,
                                                backend=self.backend,
                                                output_final_state=return_state)
        y = self.merge_heads(o)
        if not return_state:
            return y
        return y, RecurrentState(S_new, position + T)

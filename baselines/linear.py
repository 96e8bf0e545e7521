"""Linear attention (Katharopoulos et al., "Transformers are RNNs") on the Hebbian kernel.

    φ(x) = elu(x) + 1 > 0
    o_t  = φ(q_t) S_t / (φ(q_t) z_t),   S_t = Σ_{s≤t} φ(k_s)ᵀ v_s,   z_t = Σ_{s≤t} φ(k_s)ᵀ

The normaliser z rides in the same kernel call as an extra ones-column of v: with
v' = [v, 1] the inclusive Hebbian state S' = Σ φ(k)ᵀ v' is [S | z], and q S' = [num | den].
So the training / prefill path is `kernels.hebbian_attention(..., strict=False)` (Triton on
CUDA, chunked PyTorch on the CPU) and decoding is `kernels.hebbian_step`. The state is that
[B,H,d,d+1] float32 matrix: its size does not depend on the context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import hebbian_attention, hebbian_step

from .projected import ProjectedAttention
from .state import RecurrentState, check_state


def elu_feature(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


class LinearAttention(ProjectedAttention):
    """x [B,T,D] → y [B,T,D]; state: `RecurrentState` with S [B,H,d,d+1] float32."""

    def __init__(self, d_model: int, n_head: int = 4, *, eps: float = 1e-6,
                 backend: str = "auto", chunk_size: int | None = None, bias: bool = False):
        super().__init__(d_model, n_head, bias=bias)
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
        fq, fk = elu_feature(q), elu_feature(k)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)            # [v | 1]
        if T == 1 and S is not None and not torch.is_grad_enabled():
            # hebbian_step updates in place: step on a copy so the caller's state stays valid.
            o, S_new = hebbian_step(fq[:, :, 0], fk[:, :, 0], v1[:, :, 0], S.clone(),
                                    strict=False, backend=self.backend)
            o = o.unsqueeze(2)
        else:
            o, S_new = hebbian_attention(fq, fk, v1, strict=False, initial_state=S,
                                         output_final_state=return_state,
                                         chunk_size=self.chunk_size, backend=self.backend)
        # Normalise in float32 at least: den is a sum over the whole context.
        o = o.float() if o.dtype in (torch.float16, torch.bfloat16) else o
        y = (o[..., :d] / (o[..., d:] + self.eps)).to(x.dtype)
        y = self.merge_heads(y)
        if not return_state:
            return y
        return y, RecurrentState(S_new, position + T)

"""An `nn.MultiheadAttention`-shaped causal self-attention backed by BSBR or Hebbian attention.

    from bsbr import RecurrentMultiheadAttention
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, batch_first=True)
    layer.self_attn = RecurrentMultiheadAttention.from_mha(layer.self_attn, "bsbr", chunk_size=32)
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    y = layer(x, src_mask=mask)                              # causal, as before

Same parameters as `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj`), same
call: ``attn(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
average_attn_weights=True, is_causal=True) -> (out, None)``. The heads run what the transformers
drop-ins run: BSBR is `bsbr.stream` with r = q and hk = k (softmax attention inside each chunk,
scale 1/√head_dim as nn.MultiheadAttention, plus routed chunk states); Hebbian is
`kernels.normalised_hebbian_attention` (normalised elu+1 linear attention, inclusive).

What it cannot do raises ValueError: cross-attention (key or value not the query tensor), a
non-causal request (attn_mask None with is_causal=False, or a mask that is not the causal one),
padding (a key_padding_mask with a True), need_weights=True (there is no weight matrix), and
attention-weight dropout. `_qkv_same_embed_dim = False` keeps `nn.TransformerEncoderLayer`'s
fused inference fast path (which would call the softmax kernel directly) from bypassing it.

Streaming (the project's protocol): ``out, state = attn(x, x, x, state=state, return_state=True)``
continues a sequence; the state is a `BSBRState` (kind "bsbr") or a `baselines.RecurrentState`
holding S' [B,H,d,d+1] (kind "hebbian"); `state.nbytes()` is its memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from baselines import RecurrentState
from glassbrain.checks import check_int, check_optional_int
from glassbrain.hf import compute_dtype
from kernels import check_normalised_options, normalised_hebbian_attention
from kernels.bsbr import BACKENDS as BSBR_BACKENDS
from kernels.checks import same_tensor

from .config import check_long_scale, resolve_long_scale
from .state import BSBRState
from .stream import StreamSpec, bsbr_stream, empty_state

KINDS = ("bsbr", "hebbian")


def is_causal_mask(mask: torch.Tensor, T: int) -> bool:
    """True if ``mask`` ([T,T] or [N,T,T]; bool True = blocked, or float with -inf above the
    diagonal and 0 elsewhere) is exactly the causal mask."""
    if mask.shape[-2:] != (T, T):
        return False
    blocked = torch.ones(T, T, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool((mask == blocked).all())
    allowed_ok = (mask == 0) | blocked
    blocked_ok = (torch.isinf(mask) & (mask < 0)) | ~blocked
    return bool((allowed_ok & blocked_ok).all())


class RecurrentMultiheadAttention(nn.Module):
    """Causal self-attention with the interface of `nn.MultiheadAttention` (kind "bsbr" or
    "hebbian"); see the module docstring."""

    _qkv_same_embed_dim = False      # opt out of nn.TransformerEncoderLayer's fused fast path

    def __init__(self, embed_dim: int, num_heads: int, kind: str = "bsbr", *, dropout: float = 0.0,
                 bias: bool = True, batch_first: bool = False, chunk_size: int = 64,
                 top_k: int | None = None, long_scale: float | None = None,
                 feature_map: str = "elu", eps: float = 1e-6,
                 backend: str = "auto", device=None, dtype=None):
        """Causal self-attention over ``num_heads`` heads of ``embed_dim // num_heads``.

        kind: "bsbr" (chunk-local softmax plus routed chunk states) or "hebbian" (normalised
            elu+1 / relu linear attention).
        dropout: must be 0.0 (there is no attention-weight matrix to drop from).
        bias, batch_first, device, dtype: as nn.MultiheadAttention.
        chunk_size, top_k, long_scale: BSBR's chunk C >= 1, routed chunks per token (None:
            all) and λ of the routed term (None: scale / C).
        feature_map, eps: Hebbian's φ ("elu" | "relu") and denominator guard (finite, > 0).
        backend: a kernels.bsbr backend (kind "bsbr") or a kernels.hebbian one ("hebbian").
        """
        super().__init__()
        check_int("embed_dim", embed_dim, 1)
        check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: must be divisible by num_heads = {num_heads}, "
                             f"got {embed_dim}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if dropout:
            raise ValueError(f"dropout: attention-weight dropout has no equivalent here (there is "
                             f"no weight matrix); expected 0.0, got {dropout!r}")
        check_int("chunk_size", chunk_size, 1)
        check_optional_int("top_k", top_k, 1)
        check_long_scale(long_scale, "long_scale")
        if kind == "bsbr" and backend not in BSBR_BACKENDS:
            raise ValueError(f"backend: expected one of {BSBR_BACKENDS} for kind 'bsbr', "
                             f"got {backend!r}")
        check_normalised_options(feature_map, eps, None, "auto" if kind == "bsbr" else backend)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kind, self.batch_first, self.dropout = kind, batch_first, 0.0
        self.chunk_size, self.top_k = chunk_size, top_k
        self.feature_map, self.eps = feature_map, eps
        self.backend, self.long_scale = backend, long_scale
        kw = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        nn.init.xavier_uniform_(self.in_proj_weight)       # as nn.MultiheadAttention
        if bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, kind: str = "bsbr", **opts):
        """``mha``'s weights behind ``kind`` attention (mha.dropout is not carried over)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha: expected nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha: expected a self-attention nn.MultiheadAttention (one in_proj, "
                             "no bias_k/bias_v, no add_zero_attn)")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, kind, bias=mha.in_proj_bias is not None,
                  batch_first=mha.batch_first, device=w.device, dtype=w.dtype, **opts)
        new.load_state_dict({k: v for k, v in mha.state_dict().items()
                             if k in dict(new.named_parameters())})
        return new

    @property
    def spec(self) -> StreamSpec:
        """What `bsbr.stream` computes for kind "bsbr"."""
        scale = 1.0 / math.sqrt(self.head_dim)
        return StreamSpec(self.chunk_size, scale,
                          resolve_long_scale(self.long_scale, scale, self.chunk_size),
                          self.top_k, None, self.backend)

    def init_state(self, batch_size: int, device=None, dtype=None):
        """The empty history for ``batch_size`` sequences: a BSBRState (kind "bsbr"; buffers in
        ``dtype``, default the weights') or a RecurrentState with S' = 0 (kind "hebbian")."""
        check_int("batch_size", batch_size, 1)
        w = self.in_proj_weight
        device = w.device if device is None else device
        d = self.head_dim
        if self.kind == "hebbian":
            return RecurrentState(torch.zeros(batch_size, self.num_heads, d, d + 1,
                                              device=device))
        return empty_state(batch_size, self.num_heads, d, d, d, self.spec, device=device,
                           dtype=w.dtype if dtype is None else dtype, meta_keys=False)

    def _check_state(self, state, batch_size: int) -> None:
        want = RecurrentState if self.kind == "hebbian" else BSBRState
        if not isinstance(state, want):
            raise TypeError(f"state: a {self.kind!r} RecurrentMultiheadAttention expected a "
                            f"{want.__name__} or None, got {type(state).__name__}")
        t = state.S if self.kind == "hebbian" else state.k
        if t.shape[0] != batch_size or t.shape[1] != self.num_heads:
            raise ValueError(f"state: expected batch size {batch_size} and {self.num_heads} "
                             f"heads, got a state of shape {list(t.shape)}")
        if self.kind == "bsbr" and (state.hk is not None or t.shape[2] != self.chunk_size - 1):
            raise ValueError(f"state: expected a BSBRState of chunk_size {self.chunk_size} without "
                             f"meta keys (r = q, hk = k), got partial-chunk buffers "
                             f"{list(t.shape)} and hk {'set' if state.hk is not None else 'None'}")

    def _check(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        if not isinstance(query, torch.Tensor) or not query.is_floating_point():
            got = query.dtype if isinstance(query, torch.Tensor) else type(query).__name__
            raise TypeError(f"query: expected a floating tensor, got {got}")
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query: expected 3 dims with last = embed_dim = {self.embed_dim}, "
                             f"got shape {list(query.shape)}")
        if not (same_tensor(key, query) and same_tensor(value, query)):
            raise ValueError("key/value: only self-attention is supported (key and value must be "
                             "the query tensor); cross-attention cannot be computed causally "
                             "from a recurrent state")
        if need_weights:
            raise ValueError("need_weights: expected False; BSBR/Hebbian attention never forms "
                             "the attention weight matrix")
        if key_padding_mask is not None:
            pad = key_padding_mask
            pad = pad if pad.dtype == torch.bool else pad != 0
            if bool(pad.any()):
                raise ValueError("key_padding_mask: padding is not supported (a recurrent state "
                                 "would absorb the padded tokens); got a mask with padded keys")
        T = query.shape[1] if self.batch_first else query.shape[0]
        if attn_mask is None and not is_causal:
            raise ValueError("attn_mask: None with is_causal=False asks for bidirectional "
                             "attention; this module is causal only (pass the causal mask, or "
                             "is_causal=True)")
        if attn_mask is not None and not is_causal_mask(attn_mask, T):
            raise ValueError(f"attn_mask: only the causal mask is supported (True / -inf above "
                             f"the diagonal, shape [{T},{T}]); got a different mask of shape "
                             f"{list(attn_mask.shape)}")
        w = self.in_proj_weight
        if query.dtype != w.dtype and not torch.is_autocast_enabled(query.device.type):
            raise TypeError(f"query: dtype {query.dtype} differs from the module's {w.dtype}; "
                            f"cast the module (.to({query.dtype})) or run under torch.autocast")

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = True, *,
                state=None, return_state: bool = False):
        """(out, None), or (out, state) with ``return_state``: the arguments of
        nn.MultiheadAttention, plus ``state`` (None: no history) to continue a sequence. The
        state passed in is not modified."""
        self._check(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        x = query if self.batch_first else query.transpose(0, 1)          # [B,T,E]
        B, T, E = x.shape
        if state is not None:
            self._check_state(state, B)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dtype = compute_dtype(q, k, v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.kind == "hebbian":
            o, S = normalised_hebbian_attention(q, k, v, None if state is None else state.S,
                                                feature_map=self.feature_map, eps=self.eps,
                                                backend=self.backend,
                                                output_final_state=return_state)
            position = 0 if state is None else state.position
            new = RecurrentState(S, position + T) if return_state else None
        else:
            if state is None and return_state:
                state = self.init_state(B, device=x.device, dtype=dtype)
            o, new = bsbr_stream(q, k, v, state, self.spec, keep_state=return_state)
        y = self.out_proj(o.to(qkv.dtype).transpose(1, 2).reshape(B, T, E))
        y = y if self.batch_first else y.transpose(0, 1)
        return (y, new) if return_state else (y, None)


__all__ = ["RecurrentMultiheadAttention", "is_causal_mask"]

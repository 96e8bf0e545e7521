"""A generic decoder LM whose blocks differ only in the token mixer (the attention module).

    x = embed(idx)
    per block:  x = x + drop(mixer(conv(LN(x))));  x = x + drop(MLP(LN(x)))  (pre-LN)
    conv: a causal depthwise short convolution of width short_conv (`short_conv.py`), or none (0)
    logits = LN(x) @ head                    (head tied to the embedding unless tie_weights=False)

Mixers: "softmax", "linear", "sliding", "deltanet" (this package), "bdh" (`bdh.BDHAttention`)
and "bsbr" (`bsbr.BSBRAttention`, imported when first used). Every mixer obeys the streaming
protocol, so the model does too:

    logits, loss  = model(idx, targets=None)
    logits, state = model(idx, state=None, return_state=True)   # MixerLMState: one per block
    model.generate(idx, max_new_tokens, temperature=1.0, top_k=None, generator=None)

`generate` consumes the prompt once and then decodes one token at a time from the state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from glassbrain.checks import check_token_ids, next_token_loss
from glassbrain.generation import check_generate_args
from glassbrain.sampling import generate_from_state

from .deltanet import DeltaNetAttention
from .linear import LinearAttention
from .projected import check_positive_int
from .short_conv import ConvMixerState, ShortConv
from .sliding import SlidingWindowAttention
from .softmax import SoftmaxAttention

MIXERS = ("softmax", "linear", "sliding", "deltanet", "bdh", "bsbr")


def check_mixer(mixer) -> None:
    """ValueError unless ``mixer`` is one of MIXERS ("hebbian" names transformers' normalised
    linear attention elsewhere, so here it points to the two mixers it could mean)."""
    if mixer == "hebbian":
        raise ValueError("mixer: 'hebbian' is not a mixer name; use 'bdh' for BDH's attention "
                         "(bdh.BDHAttention) or 'linear' for normalised linear attention")
    if mixer not in MIXERS:
        raise ValueError(f"mixer: expected one of {MIXERS}, got {mixer!r}")


def build_mixer(mixer: str, d_model: int, n_head: int, **kwargs) -> nn.Module:
    """One attention module x [B,T,D] → y [B,T,D] by name; kwargs go to its constructor."""
    check_mixer(mixer)
    if mixer == "softmax":
        return SoftmaxAttention(d_model, n_head, **kwargs)
    if mixer == "linear":
        return LinearAttention(d_model, n_head, **kwargs)
    if mixer == "sliding":
        return SlidingWindowAttention(d_model, n_head, **kwargs)
    if mixer == "deltanet":
        return DeltaNetAttention(d_model, n_head, **kwargs)
    if mixer == "bdh":
        from bdh import BDHAttention
        return BDHAttention(d_model, n_head, **kwargs)
    if mixer == "bsbr":
        from bsbr import BSBRAttention      # lazily: bsbr may be absent or still being built
        kwargs.setdefault("chunk_size", 64)
        return BSBRAttention(d_model, n_head, **kwargs)


@dataclass
class MixerLMConfig:
    mixer: str = "softmax"
    vocab_size: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    tie_weights: bool = True
    short_conv: int = 0                # width of the causal short convolution before the mixer
    mixer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        check_mixer(self.mixer)
        if isinstance(self.short_conv, bool) or not isinstance(self.short_conv, int) \
                or self.short_conv < 0:
            raise ValueError(f"short_conv: expected an int >= 0 (0: none), "
                             f"got {self.short_conv!r}")
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "mlp_ratio"):
            check_positive_int(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {self.dropout!r}")


@dataclass
class MixerLMState:
    """One mixer state per block, and the number of tokens consumed."""
    layers: list
    position: int = 0

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers)


class MixerBlock(nn.Module):
    def __init__(self, cfg: MixerLMConfig):
        super().__init__()
        D = cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        # mixer_kwargs may carry its own "n_head": the mixer's heads alone (e.g. a one-head
        # Hebbian mixer beside multi-head baselines, compared at equal state).
        kw = dict(cfg.mixer_kwargs)
        self.mixer = build_mixer(cfg.mixer, D, kw.pop("n_head", cfg.n_head), **kw)
        self.conv = ShortConv(D, cfg.short_conv) if cfg.short_conv else None
        self.mlp = nn.Sequential(nn.Linear(D, cfg.mlp_ratio * D), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * D, D))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, state=None, return_state=False):
        h = self.ln1(x)
        if not return_state:
            a = self.mixer(h if self.conv is None else self.conv(h))
        elif self.conv is None:
            a, state = self.mixer(h, state=state, return_state=True)
        else:
            if state is not None and not isinstance(state, ConvMixerState):
                raise TypeError(f"state: a block with a short convolution takes a "
                                f"ConvMixerState, got {type(state).__name__}")
            h, conv_state = self.conv(h, None if state is None else state.conv, True)
            a, mixer_state = self.mixer(h, state=None if state is None else state.mixer,
                                        return_state=True)
            state = ConvMixerState(conv_state, mixer_state)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return (x, state) if return_state else x


class MixerLM(nn.Module):
    def __init__(self, config: MixerLMConfig):
        super().__init__()
        self.config = C = config
        self.embed = nn.Embedding(C.vocab_size, C.d_model)
        self.blocks = nn.ModuleList(MixerBlock(C) for _ in range(C.n_layer))
        self.ln_f = nn.LayerNorm(C.d_model)
        self.head = nn.Linear(C.d_model, C.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.mlp[0].weight, std=0.02)
            nn.init.normal_(blk.mlp[2].weight, std=0.02 / math.sqrt(2 * C.n_layer))
        if C.tie_weights:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, idx) -> torch.Tensor:
        """The final LayerNorm's output [B,T,D] (what the head reads), without state: a caller
        that scores a few positions applies `self.head` to those rows only."""
        x = self.embed(check_token_ids(idx, self.config.vocab_size))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x)

    def forward(self, idx, targets=None, state: MixerLMState | None = None,
                return_state: bool = False):
        if not return_state and state is None:
            logits = self.head(self.features(idx))
            loss = None if targets is None else next_token_loss(logits, targets)
            return logits, loss
        idx = check_token_ids(idx, self.config.vocab_size)
        if state is not None:
            if not isinstance(state, MixerLMState) or len(state.layers) != len(self.blocks):
                raise TypeError(f"state: expected a MixerLMState with {len(self.blocks)} layers "
                                f"or None, got {type(state).__name__}")
        x = self.embed(idx)
        new_layers = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, state=None if state is None else state.layers[i], return_state=True)
            new_layers.append(s)
        new_state = MixerLMState(new_layers, (0 if state is None else state.position)
                                 + idx.shape[1])
        logits = self.head(self.ln_f(x))
        if return_state:
            return logits, new_state
        loss = None if targets is None else next_token_loss(logits, targets)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 generator: torch.Generator | None = None, *, seed: int | None = None):
        """Prompt + ``max_new_tokens`` sampled tokens: the prompt is consumed once, then every
        new token is one step from the state (never re-running the prefix). top_k=1: greedy;
        ``generator`` (or ``seed``) makes sampling reproducible."""
        idx = check_token_ids(idx, self.config.vocab_size)
        generator = check_generate_args(idx, self.embed.weight.device, max_new_tokens,
                                        temperature, top_k, generator, seed)
        return generate_from_state(self, idx, max_new_tokens, temperature, top_k, generator)

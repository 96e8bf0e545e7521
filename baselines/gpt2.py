"""GPT-2 baseline: `transformers.GPT2LMHeadModel` behind Glass Brain's model protocol.

No pretrained weights can be downloaded here, so the model is built from a `GPT2Config`, randomly
initialised (or trained by us), with a byte vocabulary. Sizes are matched to a target parameter
count (usually BDH's) by `match_gpt2_config`.

Protocol (the same as `bdh.BDH`):
    logits, loss  = model(idx, targets=None)
    logits, state = model(idx, state=None, return_state=True)   # state: the KV cache
    model.generate(idx, max_new_tokens, temperature=1.0, top_k=None, generator=None)
The state of a softmax transformer is its KV cache, and it grows with the context: `nbytes()`
says by how much. GPT-2's learned position table (n_positions × n_embd) is also part of its cost:
it must be at least as long as the longest context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from glassbrain.hf import cache_nbytes
from glassbrain.checks import check_token_ids, next_token_loss
from glassbrain.generation import check_generate_args
from glassbrain.sampling import generate_from_state

from .gpt2_decode import GPT2StaticDecoder, cache_argument, output_cache


def gpt2_config(n_layer: int, n_embd: int, n_head: int, *, vocab_size: int = 256,
                n_positions: int = 1024, dropout: float = 0.1,
                attn_implementation: str = "sdpa") -> GPT2Config:
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation: expected 'sdpa' or 'eager', "
                         f"got {attn_implementation!r}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                      n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
                      attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                      attn_implementation=attn_implementation)


def gpt2_param_count(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of GPT2LMHeadModel (lm_head tied to wte): embeddings + 12d²+13d per block +
    final LN."""
    d = n_embd
    return vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def match_gpt2_config(target_params: int, *, n_layer: int = 6, head_dim: int = 64,
                      vocab_size: int = 256, n_positions: int = 1024, **kw) -> GPT2Config:
    """The GPT-2 config with ``n_layer`` blocks whose width (a multiple of ``head_dim``) brings
    its parameter count closest to ``target_params``."""
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")
    best = min(range(head_dim, 64 * head_dim + 1, head_dim),
               key=lambda d: abs(gpt2_param_count(n_layer, d, vocab_size, n_positions)
                                 - target_params))
    return gpt2_config(n_layer, best, best // head_dim, vocab_size=vocab_size,
                       n_positions=n_positions, **kw)


@dataclass
class GPT2State:
    """A GPT-2 stream's state: the transformers KV cache and the number of tokens consumed."""
    cache: object = None
    position: int = 0

    def nbytes(self) -> int:
        return 0 if self.cache is None else cache_nbytes(self.cache)


class GPT2LM(nn.Module):
    """`GPT2LMHeadModel` speaking the streaming protocol. ``targets`` are already shifted (the
    token after each input), as in `bdh.BDH`; the loss is plain cross-entropy over them."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.hf = GPT2LMHeadModel(config)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx, position: int) -> torch.Tensor:
        """Token ids [B,T] (int64 or int32, in range) that fit the position table after
        ``position`` tokens; returns them as int64."""
        idx = check_token_ids(idx, self.config.vocab_size)
        end = position + idx.shape[1]
        if end > self.config.n_positions:
            raise ValueError(f"idx: context of {end} tokens exceeds n_positions = "
                             f"{self.config.n_positions} (GPT-2's position table)")
        return idx

    def forward(self, idx, targets=None, state: GPT2State | None = None, return_state=False):
        position = 0 if state is None else state.position
        idx = self._check_idx(idx, position)
        if return_state:
            past = None if state is None else state.cache
            out = self.hf(input_ids=idx, use_cache=True, **{cache_argument(self.hf): past})
            return out.logits, GPT2State(output_cache(out), position + idx.shape[1])
        logits = self.hf(input_ids=idx, use_cache=False).logits
        loss = None if targets is None else next_token_loss(logits, targets)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 generator: torch.Generator | None = None, *, seed: int | None = None,
                 cache: str = "dynamic", sdpa_backend: str | None = "auto",
                 compile_step: bool = False):
        """Prompt + ``max_new_tokens`` sampled tokens, decoding through the KV cache.

        cache="dynamic": the plain HF loop (a DynamicCache that grows by concatenation).
        cache="static": `baselines.gpt2_decode.GPT2StaticDecoder`, fixed-shape StaticCache steps
        under one SDPA backend (``sdpa_backend``), optionally compiled (``compile_step``)."""
        idx = self._check_idx(idx, 0)
        generator = check_generate_args(idx, self.hf.device, max_new_tokens, temperature,
                                        top_k, generator, seed)
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache: expected 'dynamic' or 'static', got {cache!r}")
        if cache == "static":
            idx = self._check_idx(idx, max_new_tokens)
            decoder = GPT2StaticDecoder(self.hf, sdpa_backend, compile_step)
            return decoder.generate(idx, max_new_tokens, temperature, top_k, generator)
        return generate_from_state(self, idx, max_new_tokens, temperature, top_k, generator)

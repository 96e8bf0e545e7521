"""Next-token sampling shared by every model's `generate` (BDH, GPT-2, the baselines, BSBR).

It lives in the shared tier because `bdh`, `bsbr` and `baselines` may not import each other's
helpers; it is a plain function on logits, no nn.Module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .generation import check_temperature, check_top_k


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, vocab] → [B, 1]. top_k=1 is greedy (argmax, no RNG).

    Any finite temperature > 0 works: the row's maximum is subtracted first and the division
    runs in float64, so a tiny temperature sends every other logit to −inf (sampling among the
    tied maxima) rather than turning the row into inf − inf = NaN."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits: expected a [B, vocab] tensor, got "
                         f"{list(getattr(logits, 'shape', [])) or type(logits).__name__}")
    check_top_k(top_k)
    if top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    temperature = check_temperature(temperature)
    wide = logits.double()
    logits = ((wide - wide.amax(dim=-1, keepdim=True)) / temperature).float()      # max is 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def sample_loop(idx: torch.Tensor, max_new_tokens: int, prefill, step, temperature: float = 1.0,
                top_k: int | None = None, generator: torch.Generator | None = None):
    """The sampling loop of every `generate`: ``prefill(idx)`` gives the logits [B, vocab] after
    the prompt, then each sampled token [B, 1] is fed to ``step`` for the next logits (the last
    one is not fed). Returns idx followed by ``max_new_tokens`` tokens, [B, T0 + n]."""
    B, T0 = idx.shape
    out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T0] = idx
    if max_new_tokens == 0:
        return out
    logits = prefill(idx)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        out[:, T0 + i:T0 + i + 1] = nxt
        if i + 1 < max_new_tokens:
            logits = step(nxt)
    return out


def generate_from_state(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None, *,
                        state=None, return_state: bool = False, prefill_chunk: int | None = None):
    """The decoding loop of a model on the streaming protocol: the prompt once
    (`model(idx, state=state, return_state=True)`, in pieces of ``prefill_chunk`` tokens when
    given), then one step per token from the state, never the prefix again. Returns idx
    followed by ``max_new_tokens`` sampled tokens; with ``return_state`` also the state, which
    has consumed every returned token but the last. Arguments are the caller's to check."""
    held = [state]

    def feed(tokens):
        chunk = prefill_chunk or tokens.shape[1]
        for s in range(0, tokens.shape[1], chunk):
            logits, held[0] = model(tokens[:, s:s + chunk], state=held[0], return_state=True)
        return logits[:, -1]

    if max_new_tokens == 0 and return_state and idx.shape[1] > 1:
        feed(idx[:, :-1])
    out = sample_loop(idx, max_new_tokens, feed, feed, temperature, top_k, generator)
    return (out, held[0]) if return_state else out

"""Next-token sampling shared by every model's `generate` (BDH, GPT-2, the baselines, BSBR).

It lives in the shared tier because `bdh`, `bsbr` and `baselines` may not import each other's
helpers; it is a plain function on logits, no nn.Module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, vocab] → [B, 1]. top_k=1 is greedy (argmax, no RNG)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits: expected a [B, vocab] tensor, got "
                         f"{list(getattr(logits, 'shape', [])) or type(logits).__name__}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def generate_from_state(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None):
    """The decoding loop of a model on the streaming protocol: the prompt once
    (`model(idx, return_state=True)`), then one step per token from the state, never the prefix
    again. Returns idx followed by ``max_new_tokens`` sampled tokens. Arguments are the
    caller's to check."""
    logits, state = model(idx, return_state=True)
    out = [idx]
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits, state = model(nxt, state=state, return_state=True)
    return torch.cat(out, dim=1)

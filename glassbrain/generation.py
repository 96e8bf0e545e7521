"""The argument checks every language model's `generate` shares (BDH, BSBR, the mixer LMs,
GPT-2), in one place so they agree: one message per mistake, raised before any work."""
from __future__ import annotations

import math

import torch


def check_temperature(temperature) -> float:
    """A finite number > 0 (an int or a float, not a bool); returns it as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a finite number > 0, got "
                        f"{type(temperature).__name__} {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_top_k(top_k) -> None:
    """None (sample from every token) or an int >= 1 (1: greedy)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")


def check_generate_args(idx: torch.Tensor, device, max_new_tokens, temperature=1.0,
                        top_k=None, generator: torch.Generator | None = None,
                        seed: int | None = None) -> torch.Generator | None:
    """Check what every `generate(idx, max_new_tokens, temperature, top_k, generator, seed=)`
    takes, for a model on ``device`` (idx itself: the model's own token-id check). Returns the
    generator to sample with: ``generator``, or a new one on ``device`` seeded with ``seed``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    check_top_k(top_k)
    device = torch.device(device)
    if idx.device != device:
        raise ValueError(f"idx: expected device {device} (the model's), got {idx.device}")
    if generator is not None and seed is not None:
        raise ValueError("generator, seed: pass at most one of them")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        return torch.Generator(device=device).manual_seed(seed)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if top_k != 1 and generator.device.type != device.type:
            raise ValueError(f"generator: expected a torch.Generator on {device.type} (the "
                             f"model's device), got one on {generator.device}")
    return generator

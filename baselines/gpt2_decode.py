"""A tuned GPT-2 decoding path: transformers' StaticCache (fixed shapes) under one chosen SDPA
backend, optionally with the one-token step compiled.

Why: the plain HF loop (`GPT2LM.generate(cache="dynamic")`) grows a DynamicCache by
concatenation, so every step has a new key length; SDPA then dispatches per shape (cuDNN builds
a plan per shape), and nothing can be captured in a CUDA graph. A StaticCache holds
max_len slots from the start (unused ones masked), so every decoding step has the same shapes;
`sdpa_kernel` pins the backend. It is meant as the fair peer of BDH's graph decode; whether it
is faster is measured on the GPU (experiments/gpt2_decode.py), not assumed here.

Version notes: transformers 5.x calls the cache argument `cache` (4.x: `past_key_values`) and
dropped `cache_position`; StaticCache's constructor changed too. The helpers below look at the
signatures instead of version numbers (tested here on 5.24 only).
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from glassbrain.sampling import sample_next

SDPA_BACKENDS = ("auto", "math", "efficient", "flash", "cudnn", None)
_SDPA_NAMES = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION",
               "cudnn": "CUDNN_ATTENTION"}


def sdpa_context(backend: str | None, device: torch.device):
    """A context that restricts SDPA to ``backend`` ("auto": the memory-efficient kernel on
    CUDA, which takes the static cache's mask; no restriction on the CPU; None: none)."""
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend: expected one of {SDPA_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "efficient" if torch.device(device).type == "cuda" else None
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, _SDPA_NAMES[backend])])


def _params(fn) -> set:
    return set(inspect.signature(fn).parameters)


def cache_argument(hf_model) -> str:
    """The name of the forward's KV-cache argument in this transformers version."""
    return "cache" if "cache" in _params(hf_model.forward) else "past_key_values"


def output_cache(out):
    """The cache a forward returned: `out.cache` in transformers 5.x, `past_key_values` before."""
    return out["cache"] if "cache" in out else out.past_key_values


def make_static_cache(hf_model, batch_size: int, max_len: int):
    from transformers import StaticCache
    p = next(hf_model.parameters())
    accepted = _params(StaticCache.__init__)
    offered = {"config": hf_model.config, "max_cache_len": max_len, "device": p.device,
               "dtype": p.dtype}
    # 5.x sizes the cache from the first update; 4.x asks for the batch (under either name).
    for name in ("max_batch_size", "batch_size"):
        if name in accepted:
            offered[name] = batch_size
            break
    return StaticCache(**{k: v for k, v in offered.items() if k in accepted})


class GPT2StaticDecoder:
    """Greedy / sampled decoding of a `GPT2LMHeadModel` through a StaticCache.

    compile_step: run the one-token step through `torch.compile(mode="reduce-overhead")`
    (CUDA graphs on a GPU). Positions are passed as tensors so the step's inputs keep one shape.
    """

    def __init__(self, hf_model, sdpa_backend: str | None = "auto", compile_step: bool = False):
        if sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend: expected one of {SDPA_BACKENDS}, "
                             f"got {sdpa_backend!r}")
        self.hf, self.sdpa_backend = hf_model, sdpa_backend
        self._cache_arg = cache_argument(hf_model)
        self._has_cache_position = "cache_position" in _params(hf_model.forward)
        self._step = (torch.compile(hf_model, mode="reduce-overhead", dynamic=False)
                      if compile_step else hf_model)

    def _call(self, fn, ids, cache, start: int):
        T = ids.shape[1]
        pos = torch.arange(start, start + T, device=ids.device)
        kw = {self._cache_arg: cache, "position_ids": pos.unsqueeze(0).expand(ids.shape[0], T),
              "use_cache": True}
        if self._has_cache_position:
            kw["cache_position"] = pos
        return fn(input_ids=ids, **kw).logits

    @torch.no_grad()
    def prefill(self, ids, cache, start: int):
        """Feed ids [B,T] at positions start… into ``cache``; returns the logits [B,T,vocab]."""
        with sdpa_context(self.sdpa_backend, ids.device):
            return self._call(self.hf, ids, cache, start)

    @torch.no_grad()
    def step(self, ids, cache, position: int):
        """One decoding step (ids [B,1] at ``position``) through the (compiled) step."""
        with sdpa_context(self.sdpa_backend, ids.device):
            return self._call(self._step, ids, cache, position)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 generator: torch.Generator | None = None):
        B, T0 = idx.shape
        cache = make_static_cache(self.hf, B, T0 + max_new_tokens)
        out = [idx]
        with sdpa_context(self.sdpa_backend, idx.device):
            logits = self._call(self.hf, idx, cache, 0)
            for i in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], temperature, top_k, generator)
                out.append(nxt)
                if i + 1 < max_new_tokens:
                    logits = self._call(self._step, nxt, cache, T0 + i)
        return torch.cat(out, dim=1)

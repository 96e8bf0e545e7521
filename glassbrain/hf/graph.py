"""Decoding a transformers model with a `RecurrentCache` one token per row per step, the step
captured once as a CUDA graph and replayed: what `generate` runs when `use_recurrent_cache` is
on (it hands `RecurrentDecoder` to generate as the "compiled" forward of its decode loop).

Why a graph: at batch 1 a decode step of GPT-2 124M is a few hundred small kernels (LayerNorms,
matvecs, the attention step of every layer). Eagerly each costs a Python dispatch and a launch;
replayed from a graph they cost about their run time. A recurrent state is what makes this
possible: its size does not grow with the context, so one graph serves every token.

What a replayed step needs, and where it comes from:
  * fixed addresses: the token ids and position ids are copied into the decoder's buffers; the
    states are the decoder's own (one set per batch size and state layout, a "slot"), which a
    cache is bound to before its first step (its states copied in, its layers then viewing the
    slot's tensors; a cache bound earlier gets private copies first, so no two caches ever
    share a state); the logits come out in a buffer the graph owns;
  * nothing host-side that changes per token: positions arrive as a tensor (generate computes
    them from the attention mask), every per-row count of a state lives on the device, and the
    host counters a step moves (`RecurrentStateLayer.seen`) are advanced by the decoder after
    each replay (a replay runs no Python);
  * no host synchronisation inside the step (tests/integrations: a step run with
    ``Tensor.item`` and ``Tensor.__bool__`` patched to raise).

A slot is keyed by batch size, the static keyword arguments and the states' shapes, never by
the prompt length, so a new prompt length replays the graph captured for an earlier one: no
capture, no compile. A step whose inputs the graph cannot serve (several tokens, no position
ids, a growing state, autograd, training mode, inputs_embeds, requested attentions or hidden
states) runs the model eagerly, unchanged.

On the CPU (or with ``capture=False``) a slot runs the same step eagerly on its buffers: the
code path the tests compare with plain eager decoding.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from ..cuda_graph import CapturedStep
from .cache import RecurrentCache, copy_state_, map_state, state_signature

DECODE_MODES = ("auto", "graph", "eager")
# Inputs a decode step may carry that the graph does not read as tensors.
_STATIC_ONLY = ("use_cache", "return_dict", "logits_to_keep")
_OFF = ("output_attentions", "output_hidden_states")

class _Slot:
    """One batch size's decode buffers: token ids [B,1], position ids [B,1], one state per
    layer, and (when capturing) the graph reading them."""

    def __init__(self, cache: RecurrentCache, ids: torch.Tensor, positions: torch.Tensor):
        self.ids = torch.empty_like(ids)
        self.positions = torch.empty(positions.shape, dtype=positions.dtype,
                                     device=ids.device)
        self.states = [map_state(layer.state, torch.Tensor.clone) for layer in cache.layers]
        self.bound = None
        self.graph: CapturedStep | None = None
        self.failed = None            # why capturing failed (then the slot steps eagerly)

    def bind(self, cache: RecurrentCache) -> None:
        """Make ``cache``'s layers view this slot's states, with ``cache``'s values. A cache
        bound before (still alive) gets its own copies first."""
        if all(layer.state is mine for layer, mine in zip(cache.layers, self.states)):
            self.bound = weakref.ref(cache)
            return
        before = None if self.bound is None else self.bound()
        if before is not None and before is not cache:
            for layer, mine in zip(before.layers, self.states):
                if layer.state is mine:
                    layer.state = map_state(mine, torch.Tensor.clone)
        for layer, mine in zip(cache.layers, self.states):
            if layer.state is not mine:
                copy_state_(mine, layer.state)
                layer.state = mine
        self.bound = weakref.ref(cache)


class RecurrentDecoder:
    """The decode-step forward `generate` calls (``model_forward(**model_inputs)``) for a model
    whose attention is "hebbian" or "bsbr" with a `RecurrentCache`.

    mode "graph": capture on CUDA, replay after; elsewhere run the slot's step eagerly. "auto":
    "graph" on CUDA, else plain eager calls of the model. "eager": plain calls, always.
    capture: None follows the mode; False never captures (the slot's eager step)."""

    def __init__(self, model, mode: str = "auto", *, capture: bool | None = None):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode: expected one of {DECODE_MODES}, got {mode!r}")
        if capture not in (None, True, False):
            raise ValueError(f"capture: expected None, True or False, got {capture!r}")
        self._model = weakref.ref(model)
        self.mode, self.capture = mode, capture
        self._slots: dict = {}
        self.captures = 0             # graphs captured so far (a new prompt length adds none)

    @property
    def model(self):
        return self._model()

    def serves(self, device: torch.device) -> bool:
        """Whether decode steps on ``device`` go through the slots (else plain model calls)."""
        if self.mode == "eager":
            return False
        return self.mode == "graph" or device.type == "cuda"

    def _captures(self, device: torch.device) -> bool:
        if self.capture is not None:
            return self.capture and device.type == "cuda"
        return device.type == "cuda"

    def __call__(self, **inputs):
        model = self.model
        key = self._slot_key(model, inputs)
        if key is None:
            return model(**inputs)
        cache, ids = inputs["cache"], inputs["input_ids"]
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(cache, ids, inputs["position_ids"])
        slot.bind(cache)
        slot.ids.copy_(ids)
        slot.positions.copy_(inputs["position_ids"])
        static = {name: inputs[name] for name in _STATIC_ONLY if name in inputs}

        def step():
            return model(input_ids=slot.ids, position_ids=slot.positions, cache=cache,
                         **static)

        if not self._captures(ids.device) or slot.failed is not None:
            return step()
        if slot.graph is None:
            seen = [layer.seen for layer in cache.layers]
            captured = CapturedStep(step, ids.device, strict=False)
            for layer, n in zip(cache.layers, seen):   # the capture ran the step's Python
                layer.seen = n + 1                     # again: its token counts once
            if captured.graph is None:
                slot.failed = captured.error
                warnings.warn(f"RecurrentDecoder: the decode step could not be captured as a "
                              f"CUDA graph ({captured.error}); decoding eagerly")
            else:
                slot.graph = captured
                self.captures += 1
            out = captured.first
        else:
            out = slot.graph.replay()
            cache.advance(1)
        return type(out)(logits=out.logits, cache=cache)

    def _slot_key(self, model, inputs):
        """The slot serving these inputs, as a key; None when the step must run eagerly."""
        cache, ids = inputs.get("cache"), inputs.get("input_ids")
        if not isinstance(cache, RecurrentCache) or not isinstance(ids, torch.Tensor) \
                or ids.dim() != 2 or ids.shape[1] != 1 or not cache.capturable \
                or torch.is_grad_enabled() or model.training \
                or inputs.get("inputs_embeds") is not None \
                or any(inputs.get(name) for name in _OFF):
            return None
        positions = inputs.get("position_ids")
        if not isinstance(positions, torch.Tensor) or positions.shape != ids.shape:
            return None
        mask = inputs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            return None
        allowed = set(_STATIC_ONLY) | set(_OFF) | {"cache", "input_ids", "position_ids",
                                                  "attention_mask", "inputs_embeds"}
        if set(inputs) - allowed:
            return None
        # The attention mask is dropped: a generated token is always real, and the padding of
        # the prompt is already out of every row's state.
        static = tuple((name, inputs[name]) for name in _STATIC_ONLY if name in inputs)
        if any(isinstance(value, torch.Tensor) for _, value in static):
            return None
        return (tuple(ids.shape), ids.device, positions.dtype, static,
                tuple(state_signature(layer.state) for layer in cache.layers))


__all__ = ["DECODE_MODES", "CapturedStep", "RecurrentDecoder"]

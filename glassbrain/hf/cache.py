"""A transformers `Cache` of fixed-size attention states, for recurrent attention functions.

`RecurrentStateLayer` stores no keys or values: it holds one layer's attention state (an object
the attention function owns: the Hebbian S' tensor, a `bsbr.BSBRState`) and the number of
tokens it has absorbed, which is what the model reads as the cache's sequence length.

How the attention function finds its layer: a model calls ``cache.update(k, v, layer_idx,
kwargs=kwargs)`` and then ``attention_interface(module, q, k, v, mask, **kwargs)`` with the same
``kwargs`` dict (GPT-2, Llama and the models built like them). `update` hands the new keys back
unchanged and writes the layer into that dict under `STATE_KWARG`, the way transformers' paged
cache passes its block tables to the attention function; the function reads it with
`cache_layer(module, kwargs)`. If the attention function never writes the state back (another
attention implementation, or a model that does not share its kwargs), the layer's next `update`
raises instead of silently losing those tokens.

A state is fixed-size for Hebbian attention and the bounded BSBR bank, and the attention
functions update it in place while autograd is off (the per-token path allocates nothing that
outlives the call, reads nothing back to the host, and keeps every per-row count on the device),
so a decode step can be captured once as a CUDA graph and replayed (`glassbrain.hf.graph`).
`capturable` says whether a layer's state is such a state; ``is_compileable`` stays False
because transformers would then `torch.compile` the whole forward, tracing the attention
functions' kernel wrappers: the graph decoder captures the step itself instead.

A state is a tensor (Hebbian S') or an object with ``map_tensors(fn)`` (batch-first copies),
``tensors()`` (every tensor, in a fixed order), ``nbytes()`` and ``capturable`` (a `bsbr` state).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

STATE_KWARG = "recurrent_state_layer"


def state_nbytes(state) -> int:
    """Bytes of a layer state: a tensor, an object with ``nbytes()``, or None."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return state.nbytes()


def map_state(state, fn):
    """``fn`` applied to every tensor of a layer state (batch first): a tensor, or an object
    with ``map_tensors(fn)`` returning the mapped copy."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    return state.map_tensors(fn)


def state_tensors(state) -> list:
    """Every tensor of a layer state, in a fixed order (what copying a state in place pairs)."""
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [state]
    return list(state.tensors())


def state_capturable(state) -> bool:
    """Whether a state keeps its shapes and addresses through decoding (a tensor always; an
    object says so: the exact BSBR bank grows, so it cannot be captured)."""
    if state is None:
        return False
    return True if isinstance(state, torch.Tensor) else bool(state.capturable)


def copy_state_(dst, src) -> None:
    """Copy ``src`` into ``dst`` in place (states of one layout: same tensors, same shapes)."""
    for d, t in zip(state_tensors(dst), state_tensors(src), strict=True):
        if d.shape != t.shape or d.dtype != t.dtype:
            raise ValueError(f"state: cannot copy a {t.dtype} {list(t.shape)} tensor into a "
                             f"{d.dtype} {list(d.shape)} one (another batch or layout)")
        d.copy_(t)


def state_signature(state) -> tuple:
    """(type, shapes, dtypes, device) of a state: equal signatures copy into each other."""
    return (type(state).__name__,) + tuple((tuple(t.shape), t.dtype, t.device)
                                           for t in state_tensors(state))


class RecurrentStateLayer(CacheLayerMixin):
    """One layer's fixed-size attention state inside a transformers `Cache`.

    ``state``: None before the first call, then whatever the layer's attention function writes
    (`write_state`); ``seen``: tokens absorbed; ``layer_idx``: the model layer it serves.
    """
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False       # the state's shape is known only to its attention function

    def __init__(self, layer_idx: int | None = None, **kwargs):
        super().__init__()
        self.layer_idx = layer_idx
        self.state = None
        self.seen = 0
        self.device = None
        self.pending = False        # keys handed out whose attention has not written the state

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, kwargs=None, **_):
        """Count the new tokens and hand them back; put this layer into the model's attention
        kwargs (``kwargs``, the dict the model passes on to its attention function)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError("RecurrentCache: the keys of the previous call never reached a "
                               "'hebbian' or 'bsbr' attention function, so the state missed "
                               "those tokens. Use it only with model.config._attn_implementation "
                               "in ('hebbian', 'bsbr') on models that pass their attention "
                               "kwargs to the cache (GPT-2, Llama, ...)")
        if isinstance(kwargs, dict):
            kwargs[STATE_KWARG] = self
        self.pending = True
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def write_state(self, state) -> None:
        """Called by the attention function with the state after this call's tokens."""
        self.state = state
        self.pending = False

    def advance(self, n: int) -> None:
        """Count ``n`` tokens that a replayed CUDA graph fed (it runs no Python, so `update`
        did not count them)."""
        self.seen += n

    @property
    def capturable(self) -> bool:
        return state_capturable(self.state)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return state_nbytes(self.state)

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized, self.pending = None, 0, False, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = map_state(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = map_state(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = map_state(self.state, lambda t: t[indices])

    def offload(self):
        self.state = map_state(self.state, lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.device is not None:
            self.state = map_state(self.state, lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(f"tokens_to_remove: a recurrent state cannot be rolled back (assisted "
                             f"or speculative decoding needs a KV cache), got {tokens_to_remove}")


class RecurrentCache(Cache):
    """A transformers `Cache` whose layers are `RecurrentStateLayer`s: O(1) memory per token.

        cache = RecurrentCache(model.config)
        out = model.generate(ids, cache=cache, max_new_tokens=50)

    Without ``config`` or ``num_layers`` the layers are made as the model first reaches them.
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[RecurrentStateLayer(i) for i in range(num_layers or 0)])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(RecurrentStateLayer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of attention state the cache holds (independent of the context for Hebbian)."""
        return sum(layer.nbytes() for layer in self.layers)

    @property
    def capturable(self) -> bool:
        """Every layer holds a fixed-size state (after the prompt): a decode step with this
        cache can be captured as a CUDA graph."""
        return bool(self.layers) and all(layer.capturable for layer in self.layers)

    def advance(self, n: int) -> None:
        """Count ``n`` tokens fed to every layer by a replayed graph."""
        for layer in self.layers:
            layer.advance(n)


def cache_layer(module, kwargs: dict) -> RecurrentStateLayer | None:
    """The recurrent cache layer that `update` put into this attention call's kwargs, or None
    (no recurrent cache). Raises if it serves another layer than ``module``."""
    layer = kwargs.get(STATE_KWARG)
    if layer is None:
        return None
    own = getattr(module, "layer_idx", None)
    if own is not None and layer.layer_idx is not None and own != layer.layer_idx:
        raise RuntimeError(f"RecurrentCache: attention module of layer {own} was handed the "
                           f"cache layer {layer.layer_idx}; the model shares attention kwargs "
                           f"between layers, which a recurrent cache cannot follow")
    return layer


def cache_nbytes(cache) -> int:
    """Bytes held by any transformers cache: recurrent states, or keys + values of a KV cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, RecurrentStateLayer):
            total += layer.nbytes()
        else:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


__all__ = ["STATE_KWARG", "RecurrentStateLayer", "RecurrentCache", "cache_layer", "cache_nbytes",
           "map_state", "state_nbytes", "state_tensors", "state_capturable", "copy_state_",
           "state_signature"]

"""Hebbian attention inside Hugging Face transformers models, with a recurrent cache for `generate`.

    import bdh.hf                            # registers "hebbian" (importing bdh does it too)
    model.set_attn_implementation("hebbian")          # any GPT-2 / Llama-style model
    bdh.hf.use_recurrent_cache(model)                 # generate() then keeps a fixed-size state

The attention function gets q, k, v [B,H,T,D] after the model's own projections (and RoPE) and
returns [B,T,H,D]. It is normalised linear attention with a positive feature map φ, inclusive
(strict=False: a token sees itself, as softmax attention does, so converted softmax weights keep
their meaning):

    S_t = Σ_{s≤t} φ(k_s)ᵀ v_s     z_t = Σ_{s≤t} φ(k_s)     o_t = φ(q_t) S_t / (φ(q_t)·z_t + eps)

The normaliser z rides in the Hebbian kernel as an extra ones-column of v, so one
`kernels.hebbian_attention` call (chunked) takes a prompt and one `kernels.hebbian_step` a
decoded token. φ is "elu" (elu(x)+1, the default: always positive, so the normaliser never
vanishes and gradients flow for every sign of x) or "relu". φ acts on the raw q and k: the
model's softmax `scaling` would cancel in the ratio anyway. The model's attention dropout is not
applied (linear attention has no weight matrix to drop from).

Per-model options, read from the model config (set them with `bsbr.convert.convert` or by hand):
    hebbian_feature_map  "elu" | "relu"                    default "elu"
    hebbian_eps          denominator guard                  default 1e-6
    hebbian_chunk_size   chunk of the chunked kernel        default None (the kernel's default)
    hebbian_backend      kernels.hebbian backend            default "auto"

Causality: the function enforces it itself; the mask function registered with
`AttentionMaskInterface` stops the model from building a [T,T] mask (it returns None) and raises
for padding or non-causal masks, which a recurrent state cannot honour.

The recurrent cache: `RecurrentStateLayer` is a transformers cache layer that stores no keys or
values, only the attention's fixed-size state (here S with its normaliser column, [B,H,D,D+1]
float32) and the number of tokens seen. Its `update` returns the new tokens' k, v tagged with the
layer, so the attention function finds its state and writes the next one. `RecurrentCache` is a
`Cache` of such layers; `use_recurrent_cache(model)` makes `generate` build one by itself.
If the tagged keys never reach a "hebbian"/"bsbr" attention function (another attention
implementation, or a model that copies the keys before calling it), the layer's next `update`
raises instead of silently losing the history. Without a recurrent cache the attention still
works with an ordinary KV cache (past keys are replayed each call): correct, but memory grows
with the context like softmax attention.
"""
from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
import transformers

try:    # transformers 5.x: attention/mask interfaces and per-layer cache classes
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as exc:                         # pragma: no cover - depends on the install
    if "from 'kernels'" in str(exc):
        # transformers >= 5.25 imports Hugging Face's hub `kernels` package, whose import name
        # is ours (README, "Layout").
        raise ImportError(f"transformers {transformers.__version__} imported Glass Brain's "
                          f"`kernels` as Hugging Face's hub-kernels package ({exc}); install "
                          f"transformers<5.25 and `pip uninstall kernels`") from exc
    raise ImportError(f"bdh.hf / bsbr.hf need transformers >= 5.0 (AttentionInterface, "
                      f"AttentionMaskInterface, cache layers); found transformers "
                      f"{transformers.__version__}") from exc

from kernels import hebbian_attention, hebbian_step

HEBBIAN = "hebbian"
FEATURE_MAPS = ("elu", "relu")
_TAG = "_glassbrain_cache_layer"


# ----------------------------------------------------------------------------- the cache
class RecurrentStateLayer(CacheLayerMixin):
    """One layer's fixed-size attention state inside a transformers `Cache`.

    `state` is a dict owned by the attention function that uses the layer ("S" for Hebbian;
    "bank_F", "bank_h", "keys", "values", ... for BSBR): tensors with the batch first, plus
    host values that are the same for every row (BSBR's "bank_layout"), which batch reorders
    and device moves leave as they are; `seen` counts the tokens it holds, which is what the
    model reads as the cache's sequence length (position ids, mask sizes).
    """
    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: dict = {}
        self.seen = 0
        self.device = None
        self.pending = False        # keys handed out whose attention has not written the state

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Count the new tokens and hand them on, tagged with this layer (no keys are stored)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError("RecurrentCache: the keys of the previous call never reached a "
                               "'hebbian' or 'bsbr' attention function, so the state missed "
                               "those tokens. Use it only with model.config._attn_implementation "
                               "in ('hebbian', 'bsbr') on models that pass the cache's keys "
                               "straight to the attention interface (GPT-2, Llama, ...)")
        self.pending = True
        self.seen += key_states.shape[-2]
        setattr(key_states, _TAG, self)
        return key_states, value_states

    def write_state(self, **tensors) -> None:
        """Called by the attention function with the state after this call's tokens."""
        self.state.update(tensors)
        self.pending = False

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values()
                   if isinstance(t, torch.Tensor))

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized, self.pending = {}, 0, False, False

    def _map(self, fn) -> None:
        self.state = {name: fn(t) if isinstance(t, torch.Tensor) else t
                      for name, t in self.state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(f"tokens_to_remove: a recurrent state cannot be rolled back (assisted "
                             f"or speculative decoding needs a KV cache), got {tokens_to_remove}")


class RecurrentCache(Cache):
    """A transformers `Cache` whose layers are `RecurrentStateLayer`s: O(1) memory per token.

        cache = RecurrentCache(model.config)
        out = model.generate(ids, cache=cache, max_new_tokens=50)      # transformers 5.24 name
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:
            super().__init__(layer_class_to_replicate=RecurrentStateLayer)
        else:
            super().__init__(layers=[RecurrentStateLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes of attention state the cache holds (independent of the context for Hebbian)."""
        return sum(layer.nbytes() for layer in self.layers)


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


def _prepare_recurrent_cache(self, generation_config, model_kwargs, *args, **kwargs):
    """`generate`'s cache preparation, with a `RecurrentCache` instead of the default KV cache
    (bound to a model instance by `use_recurrent_cache`)."""
    name = "cache" if "cache" in inspect.signature(self.forward).parameters else "past_key_values"
    user_cache = model_kwargs.get(name)
    if user_cache is None and generation_config.use_cache is not False \
            and generation_config.cache_implementation in (None, "dynamic"):
        model_kwargs[name] = RecurrentCache(self.config)
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs,
                                                    *args, **kwargs)


def use_recurrent_cache(model) -> None:
    """Make `model.generate` keep a `RecurrentCache` (fixed-size states) instead of a KV cache.

    Overrides the instance's `_prepare_cache_for_generation` (a transformers GenerationMixin
    hook); nothing is written to the config, so `save_pretrained` output stays loadable by plain
    transformers. A reloaded model needs this call again. A cache passed to `generate` by the
    user, or a `cache_implementation` other than "dynamic", is left alone."""
    if not hasattr(type(model), "_prepare_cache_for_generation"):
        raise TypeError(f"model: expected a transformers generation model (GenerationMixin), "
                        f"got {type(model).__name__}")
    model._prepare_cache_for_generation = types.MethodType(_prepare_recurrent_cache, model)


def cache_layer_of(key: torch.Tensor) -> RecurrentStateLayer | None:
    """The recurrent cache layer that handed over these keys, or None (no recurrent cache)."""
    return getattr(key, _TAG, None)


# ----------------------------------------------------------------------------- shared checks
def padding_free_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                      mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """Mask function for "hebbian" and "bsbr": our attention is causal by construction, so no
    [T,T] mask is built. Padding and other mask shapes cannot be honoured by a recurrent state."""
    if mask_function is not causal_mask_function:
        raise ValueError("attention mask: the hebbian/bsbr attention supports only a plain causal "
                         "mask, got a modified mask function (sliding window, packed sequences, "
                         "prefix or block masks)")
    if kv_length is not None and q_length is not None \
            and int(kv_length) != int(q_offset) + int(q_length):
        raise ValueError(f"cache: the hebbian/bsbr attention needs every past token folded into "
                         f"its state (a RecurrentCache, or a growing DynamicCache); this cache "
                         f"presents {int(kv_length)} key slots for {int(q_offset)} past + "
                         f"{int(q_length)} new tokens (a static or sliding-window cache?)")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attention_mask: the hebbian/bsbr attention does not support padding "
                         "(a recurrent state would absorb the pad tokens); got an attention_mask "
                         "with zeros. Use unpadded batches (e.g. batch size 1 or equal lengths).")
    return None


def check_attention_call(module, query, key, attention_mask, name: str) -> None:
    """Reject what a causal recurrent attention cannot compute, with a clear message."""
    if not getattr(module, "is_causal", True):
        raise ValueError(f"{name} attention: module {type(module).__name__} is not causal "
                         f"(cross-attention or bidirectional); only causal self-attention is "
                         f"supported")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError(f"attention_mask: {name} attention accepts None or a 4-D causal mask, got "
                         f"{type(attention_mask).__name__} of shape "
                         f"{list(getattr(attention_mask, 'shape', []))}")
    Tq, Tk = query.shape[2], key.shape[2]
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if allowed.shape[-2:] != (Tq, Tk):
        raise ValueError(f"attention_mask: expected [..., {Tq}, {Tk}] (queries, keys), got "
                         f"{list(attention_mask.shape)}")
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=allowed.device).tril(Tk - Tq)
    if not bool((allowed == causal).all()):
        raise ValueError(f"attention_mask: {name} attention supports only causal masks; got a 4-D "
                         f"mask that differs from the causal one (padding or a custom pattern)")


def expand_kv_heads(query, key, value):
    """Repeat grouped key/value heads (GQA) to the query heads."""
    H, Hk = query.shape[1], key.shape[1]
    if Hk == H:
        return key, value
    if H % Hk:
        raise ValueError(f"key: {Hk} key/value heads do not divide {H} query heads")
    return key.repeat_interleave(H // Hk, dim=1), value.repeat_interleave(H // Hk, dim=1)


def compute_dtype(*tensors) -> torch.dtype:
    """One dtype for the kernel: the widest input dtype (autocast can mix them), and float32
    for half types on the CPU (no fast or exact half kernels there)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"query/key/value: expected floating tensors, got {dtype}")
    if tensors[0].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def config_option(config, name: str, default, allowed=None):
    value = getattr(config, name, None)
    value = default if value is None else value
    if allowed is not None and value not in allowed:
        raise ValueError(f"config.{name}: expected one of {allowed}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- Hebbian
def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"hebbian_feature_map: expected one of {FEATURE_MAPS}, got {kind!r}")


def normalised_hebbian(q, k, v, state, *, kind="elu", eps=1e-6, chunk_size=None, backend="auto",
                       output_final_state=False):
    """Inclusive normalised linear attention on [B,H,T,D] tensors with state S [B,H,D,D+1].

    Returns (o [B,H,T,D] in v's dtype, final S or None). A single token with a state and no
    autograd runs the step kernel, which updates ``state`` in place (the cache owns it)."""
    dtype = compute_dtype(q, k, v)
    fq, fk = feature_map(q.to(dtype), kind), feature_map(k.to(dtype), kind)
    ones = torch.ones_like(v[..., :1], dtype=dtype)
    v1 = torch.cat([v.to(dtype), ones], dim=-1)               # the normaliser column
    if state is not None and q.shape[2] == 1 and not torch.is_grad_enabled():
        o1, S = hebbian_step(fq[:, :, 0], fk[:, :, 0], v1[:, :, 0], state, strict=False,
                             backend=backend)
        o1 = o1.unsqueeze(2)
    else:
        o1, S = hebbian_attention(fq, fk, v1, scale=1.0, strict=False, initial_state=state,
                                  output_final_state=output_final_state, chunk_size=chunk_size,
                                  backend=backend)
    o1 = o1.float()
    o = o1[..., :-1] / (o1[..., -1:] + eps)
    return o.to(v.dtype), S


def hebbian_options(config) -> dict:
    return dict(kind=config_option(config, "hebbian_feature_map", "elu", FEATURE_MAPS),
                eps=float(config_option(config, "hebbian_eps", 1e-6)),
                chunk_size=getattr(config, "hebbian_chunk_size", None),
                backend=config_option(config, "hebbian_backend", "auto"))


def hebbian_attention_forward(module, query, key, value, attention_mask=None, scaling=None,
                              dropout=0.0, **kwargs):
    """transformers attention function "hebbian": q, k, v [B,H,T,D] → ([B,T,H,D], None)."""
    check_attention_call(module, query, key, attention_mask, HEBBIAN)
    opts = hebbian_options(module.config)
    layer = cache_layer_of(key)
    key, value = expand_kv_heads(query, key, value)
    Tq = query.shape[2]
    state = layer.state.get("S") if layer is not None else None
    if layer is None and key.shape[2] > Tq:
        # An ordinary KV cache: the keys before this call's queries are the history; fold them
        # into a state first (correct, but O(context) per call).
        _, state = normalised_hebbian(key[:, :, :-Tq], key[:, :, :-Tq], value[:, :, :-Tq], None,
                                      output_final_state=True, **opts)
        key, value = key[:, :, -Tq:], value[:, :, -Tq:]
    o, S = normalised_hebbian(query, key, value, state, output_final_state=layer is not None,
                              **opts)
    if layer is not None:
        layer.write_state(S=S)
    return o.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "hebbian" with transformers (idempotent; importing this module does it)."""
    AttentionInterface.register(HEBBIAN, hebbian_attention_forward)
    AttentionMaskInterface.register(HEBBIAN, padding_free_mask)


register()

__all__ = ["HEBBIAN", "RecurrentStateLayer", "RecurrentCache",
           "cache_nbytes", "use_recurrent_cache", "hebbian_attention_forward",
           "normalised_hebbian", "register"]

"""The transformers plumbing the model packages share: the recurrent cache, the checks every
recurrent attention function makes, the "hebbian" attention function, and the hook that makes
`generate` use the recurrent cache. Importing it registers "hebbian" with transformers.

    import glassbrain.hf
    model.set_attn_implementation("hebbian")          # "bsbr" once `bsbr` is imported
    glassbrain.hf.use_recurrent_cache(model)          # generate() keeps fixed-size states and
                                                      # replays each decode step as a CUDA graph
    cache = glassbrain.hf.RecurrentCache(model.config)   # or pass one to generate / forward

Padded batches (left or right) work: each row computes what it computes alone.
"""
import transformers

try:    # transformers 5.x: attention/mask interfaces and per-layer cache classes
    from transformers import AttentionInterface  # noqa: F401
    from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: F401
    from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
except ImportError as exc:                         # pragma: no cover - depends on the install
    if "from 'kernels'" in str(exc):
        # transformers >= 5.25 imports Hugging Face's hub `kernels` package, whose import name
        # is ours (README, "Layout").
        raise ImportError(f"transformers {transformers.__version__} imported Glass Brain's "
                          f"`kernels` as Hugging Face's hub-kernels package ({exc}); install "
                          f"transformers<5.25 and `pip uninstall kernels`") from exc
    raise ImportError(f"glassbrain.hf needs transformers >= 5.0 (AttentionInterface, "
                      f"AttentionMaskInterface, cache layers); found transformers "
                      f"{transformers.__version__}") from exc

from .cache import (STATE_KWARG, RecurrentCache, RecurrentStateLayer, cache_layer, cache_nbytes,
                    copy_state_, map_state, state_capturable, state_nbytes, state_signature,
                    state_tensors)
from .checks import (PaddingMask, check_attention_call, compute_dtype, config_options,
                     expand_kv_heads, padding_mask)
from .generation_hook import check_generation_hook, use_recurrent_cache
from .graph import DECODE_MODES, CapturedStep, RecurrentDecoder
from .hebbian import HEBBIAN, HebbianOptions, hebbian_attention_forward

__all__ = ["STATE_KWARG", "RecurrentCache", "RecurrentStateLayer", "cache_layer", "cache_nbytes",
           "map_state", "state_nbytes", "state_tensors", "state_capturable", "copy_state_",
           "state_signature", "check_attention_call", "compute_dtype", "config_options",
           "expand_kv_heads", "PaddingMask", "padding_mask", "check_generation_hook",
           "use_recurrent_cache", "DECODE_MODES", "CapturedStep", "RecurrentDecoder", "HEBBIAN",
           "HebbianOptions", "hebbian_attention_forward"]

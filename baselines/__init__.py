"""Baselines that speak Glass Brain's streaming protocol."""
from .deltanet import DeltaNetAttention
from .gpt2 import GPT2LM, GPT2State, gpt2_config, gpt2_param_count, match_gpt2_config
from .linear import LinearAttention
from .lm import MIXERS, MixerLM, MixerLMConfig, MixerLMState, build_mixer
from .short_conv import ConvMixerState, ShortConv
from .sliding import SlidingWindowAttention
from .softmax import SoftmaxAttention
from .state import KVCacheState, RecurrentState

__all__ = ["GPT2LM", "GPT2State", "gpt2_config", "gpt2_param_count", "match_gpt2_config",
           "SoftmaxAttention", "LinearAttention", "SlidingWindowAttention",
           "DeltaNetAttention", "KVCacheState", "RecurrentState", "MIXERS", "MixerLM",
           "MixerLMConfig", "MixerLMState", "build_mixer", "ShortConv", "ConvMixerState"]

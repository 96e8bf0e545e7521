"""Baselines that speak Glass Brain's streaming protocol."""
from .gpt2 import GPT2LM, GPT2State, gpt2_config, gpt2_param_count, match_gpt2_config, sample_next

__all__ = ["GPT2LM", "GPT2State", "gpt2_config", "gpt2_param_count", "match_gpt2_config",
           "sample_next"]

"""DeltaNet's delta rule: a K×V state per head written by error-correcting rank-one updates."""
from .api import BACKENDS, check_delta_inputs, delta_rule, delta_rule_step, fla_available
from .chunk import chunk_delta_rule_torch
from .naive import delta_rule_recurrent, delta_rule_step_naive

__all__ = ["BACKENDS", "delta_rule", "delta_rule_step", "delta_rule_recurrent",
           "delta_rule_step_naive", "chunk_delta_rule_torch", "check_delta_inputs",
           "fla_available"]

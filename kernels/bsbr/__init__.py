"""BSBR (block-sparse attention with block retrieval), made causal: chunk-local softmax
attention plus a routed readout of per-chunk states. naive.py has the math, NOTES.md the
algorithm, costs and limits of the fast paths, launch.py the per-call launch choices, layout.py
the two layouts of per-token tensors, varlen.py packed sequences (cu_seqlens)."""
from .api import bsbr_attention, chunk_local_attention, chunk_states, routed_readout_step
from .decode_rows import RowsLayout, bsbr_rows_step
from .launch import BSBRLaunch, LocalLaunch, ReadoutLaunch, RoutingLaunch, StatesLaunch
from .layout import LAYOUTS
from .naive import (bsbr_attention_ref, chunk_local_attention_ref, chunk_states_ref,
                    routed_readout_step_ref)
from .validate import BACKENDS
from .varlen import VarlenStates

__all__ = ["bsbr_attention", "chunk_local_attention", "chunk_states", "routed_readout_step",
           "bsbr_attention_ref", "chunk_local_attention_ref", "chunk_states_ref",
           "routed_readout_step_ref", "BACKENDS", "BSBRLaunch", "RoutingLaunch", "ReadoutLaunch",
           "LocalLaunch", "StatesLaunch", "LAYOUTS", "VarlenStates", "RowsLayout",
           "bsbr_rows_step"]

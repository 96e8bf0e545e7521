"""Glass Brain kernels: Triton kernels, autograd Functions and their PyTorch references.

Imports nothing else of ours. Every public name is importable from here
(`from kernels import hebbian_attention`).
"""
from .bsbr import BACKENDS as BSBR_BACKENDS
from .bsbr import bsbr_attention, chunk_local_attention, chunk_states, routed_readout_step
from .deltanet import chunk_delta_rule_torch, delta_rule, delta_rule_recurrent, delta_rule_step
from .hebbian import _SPARSE as hebbian_lazy_names
from .hebbian import (BACKENDS, chunk_hebbian_torch, hebbian_attention, hebbian_quadratic,
                      hebbian_recurrent, hebbian_step)
from .hebbian import check_normalised_options, normalised_hebbian_attention
from .hebbian import (ChunkLaunch, CompactLaunch, EncodeGateLaunch, EncodeRopeLaunch,
                      ReduceLaunch, SparseStepLaunch, StepLaunch)

__all__ = ["BACKENDS", "hebbian_attention", "hebbian_step", "normalised_hebbian_attention",
           "check_normalised_options", "hebbian_quadratic",
           "hebbian_recurrent", "chunk_hebbian_torch", "BSBR_BACKENDS", "bsbr_attention",
           "chunk_local_attention", "chunk_states", "routed_readout_step", "delta_rule",
           "delta_rule_step",
           "delta_rule_recurrent", "chunk_delta_rule_torch", "SPARSE_BACKENDS", "compact_nonzero",
           "sparse_hebbian_step", "sparse_rows_matmul", "ChunkLaunch", "StepLaunch",
           "CompactLaunch", "SparseStepLaunch", "EncodeRopeLaunch", "EncodeGateLaunch",
           "ReduceLaunch"]


def __getattr__(name):
    # The sparse decoding step is exported lazily, through kernels.hebbian's own lazy export:
    # importing the package must not load Triton.
    if name in hebbian_lazy_names:
        from . import hebbian
        return getattr(hebbian, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Hebbian attention: a fixed-size K×V state per head (the BDH memory)."""
from .api import BACKENDS, hebbian_attention, hebbian_step
from .normalised import FEATURE_MAPS, check_normalised_options, normalised_hebbian_attention
from .normalised_step import normalised_hebbian_step
from .launches import (ChunkLaunch, CompactLaunch, EncodeGateLaunch, EncodeRopeLaunch,
                       ReduceLaunch, SparseStepLaunch, StepLaunch)
from .naive import hebbian_quadratic, hebbian_recurrent
from .torch_chunk import chunk_hebbian_torch

__all__ = ["BACKENDS", "hebbian_attention", "hebbian_step", "normalised_hebbian_attention",
           "check_normalised_options", "FEATURE_MAPS", "normalised_hebbian_step",
           "hebbian_quadratic",
           "hebbian_recurrent", "chunk_hebbian_torch", "SPARSE_BACKENDS", "compact_nonzero",
           "sparse_hebbian_step", "sparse_rows_matmul", "ChunkLaunch", "StepLaunch",
           "CompactLaunch", "SparseStepLaunch", "EncodeRopeLaunch", "EncodeGateLaunch",
           "ReduceLaunch"]

# The sparse decoding step is exported lazily (PEP 562): importing the package must not load
# Triton, and sparse_step.py defines its kernels at import.
_SPARSE = ("SPARSE_BACKENDS", "compact_nonzero", "sparse_hebbian_step", "sparse_rows_matmul")


def __getattr__(name):
    if name in _SPARSE:
        from . import sparse_step
        return getattr(sparse_step, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

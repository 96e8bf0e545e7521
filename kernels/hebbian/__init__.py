"""Hebbian attention: a fixed-size K×V state per head (the BDH memory)."""
from .api import BACKENDS, hebbian_attention, hebbian_step
from .reference import hebbian_quadratic, hebbian_recurrent
from .torch_chunk import chunk_hebbian_torch

__all__ = ["BACKENDS", "hebbian_attention", "hebbian_step", "hebbian_quadratic",
           "hebbian_recurrent", "chunk_hebbian_torch"]

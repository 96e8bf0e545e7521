"""RoPE on BDH's neuron axis with exact phases at any position, and the fused RoPE + dense
q = k Hebbian attention used for BDH training pieces.

    naive.py          phases and the PyTorch rotation (the reference)
    triton_rotate.py  the Triton rotation pass (one read, one write)
    rotate.py         autograd Functions choosing between them; device-held positions for graphs
    qk_dense.py       RoPE + strict dense Hebbian attention with q = k, one autograd Function
"""
from .naive import THETA, official_freqs, pair_freqs64, rope_angles, rope_tables, rotate_reference
from .qk_dense import rope_dense_attention
from .rotate import rotate_at, rotate_neurons

__all__ = ["THETA", "official_freqs", "pair_freqs64", "rope_angles", "rope_tables",
           "rotate_reference", "rotate_neurons", "rotate_at", "rope_dense_attention"]

"""What the model packages (bdh, bsbr, baselines) share that is not a kernel: token and loss
checks, sampling, atomic checksummed files, and the transformers plumbing (`glassbrain.hf`).

Tiers: `kernels` (ops) < `glassbrain` (shared, non-op) < `bdh`, `bsbr`, `baselines` (layers and
models) < `experiments`, `serve`. Nothing here imports a model package.
"""
from .atomic_file import CorruptFileError, atomic_write, load_checked, save_checked
from .sampling import generate_from_state, sample_next

__all__ = ["CorruptFileError", "atomic_write", "load_checked", "save_checked",
           "generate_from_state", "sample_next"]

"""BDH ("Dragon Hatchling"): config, model, drop-in attention module, streaming state, probes.

    from bdh import BDH, BDHConfig
    model = BDH(BDHConfig())                             # the official architecture
    logits, loss = model(idx, targets)
    logits, state = model(idx, state=state, return_state=True)
    out = model.generate(idx, 100, top_k=1)
"""
from .attention import BDHAttention
from .config import BDHConfig
from .model import BDH
from .probes import SparsityProbe
from .sparse_decode import sparse_decode_step
from .state import BDHState, load_state, save_state
from .checkpoint import load_trained_bdh
# The transformers plumbing (importing it registers attn_implementation="hebbian").
from glassbrain.hf import RecurrentCache, use_recurrent_cache

__all__ = ["BDHConfig", "BDH", "BDHAttention", "BDHState", "save_state", "load_state",
           "SparsityProbe", "RecurrentCache", "use_recurrent_cache", "sparse_decode_step",
           "load_trained_bdh"]

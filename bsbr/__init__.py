"""BSBR (block-sparse attention with block retrieval), made causal: the attention module, the
hierarchical state bank, the streaming state and a small language model.

    from bsbr import BSBRAttention, BankConfig, BSBRLM, BSBRLMConfig
    attn = BSBRAttention(d_model=256, n_head=4, chunk_size=64, top_k=8,
                         bank=BankConfig(slots_per_level=(8, 4, 4)))
    y, state = attn(x, state=None, return_state=True)     # continue with state=state
    model = BSBRLM(BSBRLMConfig())
    logits, loss = model(idx, targets)
    out = model.generate(idx, 100, top_k=1)
"""
from .attention import BSBRAttention
from .bank import empty_bank, push_chunks, update_salience
from .config import BankConfig, BSBRLMConfig
from .model import BSBRLM
from .state import BankState, BSBRLMState, BSBRState
from .stream import StreamSpec, bsbr_stream, empty_state
from .hf import BSBROptions  # registers attn_implementation="bsbr" (glassbrain.hf: "hebbian")
from .convert import convert
from .mha import RecurrentMultiheadAttention
from .sizing import match_bsbr_config

__all__ = ["BSBRAttention", "BankConfig", "BSBRLMConfig", "BSBRLM", "BSBRState", "BankState",
           "BSBRLMState", "empty_bank", "push_chunks", "update_salience", "StreamSpec",
           "empty_state", "bsbr_stream", "BSBROptions", "convert", "RecurrentMultiheadAttention",
           "match_bsbr_config"]

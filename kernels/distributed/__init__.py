"""Context parallelism: one long sequence split along time over the ranks of a
torch.distributed process group, each rank holding a consecutive piece.

A recurrent state makes this cheap: Hebbian attention passes only the fixed-size state
[B,H,K,V] between ranks (`hebbian_attention_cp`), BSBR only the per-chunk states and meta keys
of the earlier ranks (`bsbr_attention_cp`). Each is one collective in the forward and one in the
backward. Decoding never needs this: it carries one fixed-size state per sequence.
"""
from .bsbr_cp import bsbr_attention_cp
from .hebbian_cp import hebbian_attention_cp
from .split import rank_slice, split_lengths

__all__ = ["hebbian_attention_cp", "bsbr_attention_cp", "split_lengths", "rank_slice"]

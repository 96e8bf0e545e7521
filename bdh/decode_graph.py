"""One BDH decoding step captured as a CUDA graph, replayed once per generated token.

Why: at batch 1 a decoding step is ~90 small kernels (6 layers of three matvecs, RoPE, the
Hebbian step and its reduction, LayerNorms). Eagerly each costs a Python dispatch and a launch
(~30 µs), which is 3–5 ms per token, while the work itself — reading the bf16 weights and
reading + writing the float32 state — is a few hundred µs. A graph replays all of them with one
launch.

What a graph needs, and how `bdh.decode.BDHDecoder` provides it:
  * fixed addresses: the token ids go into a static [B,1] buffer, the states are the decoder's
    (updated in place), the logits come out in a buffer the graph owns;
  * no host-side values that change per token: the RoPE positions are an int64 tensor on the
    device that the RoPE kernels read (`kernels.rope.rotate_at`) and that the step itself
    increments;
  * no synchronisation inside the step: `BDH._run` and `sparse_decode_step` check nothing on
    the device.

`DecodeGraph(step)` runs ``step()`` once eagerly, then captures it; ``replay()`` runs the
captured step again. tests/models/test_bdh_decode_graph.py compares graph and eager decoding
on a GPU.
"""
from __future__ import annotations

import torch


# One side stream per device for every DecodeGraph's eager first step. Why not a new stream per
# graph: cuBLAS gets a workspace per (handle, stream) that PyTorch keeps for the life of the
# process (32 MiB on Hopper), so each new stream's first matmul left 32 MiB allocated for good.
# The memory wall showed it as BDH's decode peak rising by exactly 32 MiB per context point (a
# new DecodeGraph per point); a memory snapshot on the H200 traced the blocks to
# at::cuda::setWorkspaceForHandle under the eager step's bmm.
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class DecodeGraph:
    """A captured decoding step. ``step()`` reads its inputs from, and writes its outputs to,
    tensors that live as long as the graph (the decoder's token buffer, states and positions)
    and returns the logits.

    The first call runs eagerly (it compiles and warms every kernel) on a side stream, as
    CUDA graph capture requires; the capture happens right after it:

        g = DecodeGraph(step, device)     # runs step() once, for real, then records it
        logits = g.logits                 # that first step's logits
        logits = g.replay()               # the next step: the same buffer, overwritten
    """

    def __init__(self, step, device: torch.device):
        device = torch.device(device)
        if not torch.cuda.is_available() or device.type != "cuda":
            raise ValueError(f"DecodeGraph: CUDA graphs need a CUDA model, got {device}")
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self.logits = step()                   # the first real step, eager
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._out = step()                     # recorded, not run

    def replay(self) -> torch.Tensor:
        """Run the captured step; returns its logits (a buffer overwritten by the next
        replay: copy it to keep it)."""
        self.graph.replay()
        self.logits = self._out
        return self._out

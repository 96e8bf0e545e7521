"""One BDH decoding step captured as a CUDA graph, replayed once per generated token.

Why: at batch 1 a decoding step is ~90 small kernels (6 layers of three matvecs, RoPE, the
Hebbian step and its reduction, LayerNorms). Eagerly each costs a Python dispatch and a launch
(~30 µs), which is 3–5 ms per token, while the work itself — reading the bf16 weights and
reading + writing the float32 state — is a few hundred µs. A graph replays all of them with one
launch.

What a graph needs, and how the step provides it:
  * fixed addresses: the token id goes into a static [B,1] buffer, the state tensors are the
    caller's (updated in place), the logits come out in a buffer the graph owns;
  * no host-side values that change per token: the RoPE position is an int64 tensor on the
    device that the RoPE kernel reads (`kernels.rope.rotate_at`) and that the graph itself
    increments after the step;
  * no synchronisation inside the step: `BDH._run` checks nothing on the device.

`DecodeGraph.step()` is equivalent to `model._run(idx, states, position, want_state=True,
inplace=True, last_only=True)` followed by `position += 1`; tests/models/test_bdh_decode_graph.py
compares the two on a GPU.
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
    """A captured single-token step of ``model`` on the float32 ``states`` (a list of
    [B,nh,N,D] tensors, updated in place on every step) starting at RoPE ``position``.

    The first step runs eagerly (it compiles and warms every kernel) on a side stream, as
    CUDA graph capture requires; the capture happens right after it. Use:

        g = DecodeGraph(model, states, position, first_token)   # runs step 1 eagerly
        logits = g.logits                                        # [B,1,vocab]
        g.step(next_token)                                       # steps 2, 3, …
    """

    def __init__(self, model, states: list, position: int, token: torch.Tensor, *,
                 sparse: bool = False):
        if not torch.cuda.is_available() or token.device.type != "cuda":
            raise ValueError(f"DecodeGraph: CUDA graphs need a CUDA model, got {token.device}")
        self.model = model
        self.sparse = sparse       # capture bdh.sparse_decode.sparse_decode_step instead of _run
        self.states = states
        self.idx = token.detach().clone().view(-1, 1)
        self.pos = torch.tensor([int(position)], dtype=torch.int64, device=token.device)
        side = _side_stream(token.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self.logits = self._forward()          # the first real step, eager
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._out = self._forward()            # recorded, not run

    def _forward(self) -> torch.Tensor:
        if self.sparse:
            from .sparse_decode import sparse_decode_step
            logits, _ = sparse_decode_step(self.model, self.idx, self.states, self.pos)
            self.pos.add_(1)
            return logits
        logits, _ = self.model._run(self.idx, self.states, self.pos, want_state=True,
                                    inplace=True, last_only=True)
        self.pos.add_(1)
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` [B] or [B,1]; returns the logits [B,1,vocab] (a buffer overwritten by
        the next step: copy it to keep it)."""
        self.idx.copy_(token.view(-1, 1))
        self.graph.replay()
        self.logits = self._out
        return self._out

"""One decoding step captured as a CUDA graph and replayed: what BDH's decoder and the
transformers decode path share.

Why a graph: a decode step at batch 1 is hundreds of small kernels; eagerly each costs a Python
dispatch and a launch, replayed from a graph they cost about their run time. A recurrent state
is what makes it possible: its size does not grow, so one graph serves every token.

`CapturedStep(step, device)` runs ``step()`` once eagerly on a side stream (it compiles and
warms every kernel, as capture requires), then records it; ``first`` is that eager run's
result, ``replay()`` runs the recorded step again and returns its (fixed) output buffers. The
step must read its inputs from, and write its outputs to, tensors that live as long as the
graph, and read nothing back to the host.
"""
from __future__ import annotations

import torch

# One side stream per device for every graph's eager first step. Why not a new stream per
# graph: cuBLAS gets a workspace per (handle, stream) that PyTorch keeps for the life of the
# process (32 MiB on Hopper), so each new stream's first matmul left 32 MiB allocated for good
# (seen as BDH's decode peak rising by exactly 32 MiB per new decoder; a memory snapshot traced
# the blocks to at::cuda::setWorkspaceForHandle under the eager step's bmm).
_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream of ``device`` on which every graph's eager first step runs."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class CapturedStep:
    """``step()`` run once eagerly, then recorded as a CUDA graph (see the module docstring).

    strict: a step that cannot be captured raises (True), or leaves ``graph`` None with the
    reason in ``error`` (False; the eager run's result stands and the caller steps eagerly)."""

    def __init__(self, step, device, *, strict: bool = True):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"device: CUDA graphs need a CUDA device, got {device}")
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            self.first = step()                        # the first real step, eager
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph, self.out, self.error = torch.cuda.CUDAGraph(), None, None
        try:
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.out = step()                      # recorded, not run
        except RuntimeError as exc:
            if strict:
                raise
            self.graph, self.error = None, exc

    def replay(self):
        """Run the recorded step; returns its outputs (buffers the next replay overwrites:
        copy them to keep them)."""
        self.graph.replay()
        return self.out

"""The two collectives context parallelism needs, with their gradients.

`gather_ranks(x, group)`: every rank's x stacked in rank order, [world, *x.shape]. Forward is
an all-gather; backward is a reduce-scatter (rank s receives the sum over all ranks of the
gradient of slice s), because every rank may read every other rank's slice.

`agree_on_inputs(...)`: one all-gather of a few integers per rank (its checks passed or not, its
sizes) before any real work, so a bad input on one rank raises on every rank instead of leaving
the others waiting in a collective forever.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x.contiguous(), group=group)


def _reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x.contiguous(), group=group)


class _GatherRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_into(out, x, group)
        return out.view((world,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, grad):
        world = grad.shape[0]
        own = grad.new_empty(grad.shape[1:])
        _reduce_scatter_into(own, grad.reshape((world * grad.shape[1],) + tuple(grad.shape[2:])),
                             ctx.group)
        return own, None


def gather_ranks(x: torch.Tensor, group=None, needs_grad: bool = False) -> torch.Tensor:
    """[world, *x.shape]: slice s is rank s's x (x must have the same shape on every rank).
    Differentiable: the gradient reaching rank s's x is the sum of every rank's gradient of
    slice s. Every rank of the group must run the backward once one does, so ``needs_grad``
    (agreed by all ranks) puts the gather in the graph even where this rank's x needs no
    gradient (a rank that sends zeros)."""
    if needs_grad and not x.requires_grad:
        x = x.detach().requires_grad_()
    return _GatherRanks.apply(x, group)


class _Join(torch.autograd.Function):
    """``out`` unchanged, with ``tied`` made a (zero-gradient) input: a rank whose output does
    not read ``tied`` still runs the backward of the collective that made it, which the other
    ranks' backwards wait on."""

    @staticmethod
    def forward(ctx, out, tied):
        ctx.tied_shape, ctx.tied_dtype = tied.shape, tied.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.tied_shape, dtype=ctx.tied_dtype)


def join(out: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    """``out``, tied to ``tied`` in the autograd graph (see `_Join`)."""
    if not (torch.is_grad_enabled() and tied.requires_grad):
        return out
    return _Join.apply(out, tied)


def _collective_device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_inputs(sizes: list[int], error: Exception | None, group=None) -> torch.Tensor:
    """Every rank's ``sizes`` as an int64 tensor [world, len(sizes)], after checking that every
    rank's own checks passed (``error`` None). Raises on every rank otherwise: the failing
    rank its own error, the others a ValueError naming the failing ranks."""
    row = torch.tensor([0 if error is None else 1, *map(int, sizes)], dtype=torch.int64,
                       device=_collective_device(group))
    table = gather_ranks(row, group).cpu()
    failed = [s for s in range(table.shape[0]) if table[s, 0]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"context parallelism: the inputs of rank(s) {failed} were refused "
                         f"(their own error says why); no rank ran the attention")
    return table[:, 1:]


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank in ``group``, size of ``group``); ValueError when torch.distributed is not set up."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: context parallelism needs an initialised torch.distributed "
                         "process group (torchrun, or init_process_group), got none")
    return dist.get_rank(group), dist.get_world_size(group)


def require_equal(table: torch.Tensor, names: tuple[str, ...], first: int = 1) -> None:
    """ValueError unless columns ``first`` on of ``table`` (one row per rank, as
    `agree_on_inputs` returns it; column i + first is ``names[i]``) agree across ranks."""
    for i, name in enumerate(names):
        col = table[:, first + i].tolist()
        if len(set(col)) > 1:
            raise ValueError(f"{name}: every rank must pass the same value, got {col} by rank")

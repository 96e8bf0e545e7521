"""Data-parallel training on PyTorch's own engine, for `experiments.train` under torchrun:

    torchrun --nproc-per-node N -m experiments.train --model bdh --preset h100 [--fsdp]

`start` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process
group: NCCL on GPUs (each process takes the GPU of its LOCAL_RANK, with NVLink multicast off
unless NCCL_NVLS_ENABLE is set), gloo on the CPU. Without torchrun, or with one process, it
returns `SINGLE`, whose every method leaves the single-process run exactly as it was.

The contract of a run on N processes:

* batches: every rank draws the same global batch of --batch-size sequences from the same
  sampler and keeps its own rows (`rows`: as even as N allows), so the global batch, the
  sampler's state and the checkpoint do not depend on N;
* gradients: DistributedDataParallel averages the ranks' gradients, and each rank's loss is
  weighted by N · its rows / batch size (`loss_weight`), so the update is that of one process
  on the whole batch even when N does not divide it; `--fsdp` shards parameters, gradients and
  optimizer state instead (FSDP2 `fully_shard`: each block of a ModuleList, then the model);
* logged loss: the mean over the global batch (`global_mean`); the time limit stops every rank
  at the same step (`any_rank`);
* dropout: each rank reseeds its own stream every step from (seed, step, rank), so a run of N
  ranks resumes exactly; runs of different N draw different masks (a rank holds other rows);
* checkpoints: rank 0 writes them (atomically, as one process does), in one process's format:
  the unwrapped model's state_dict and the optimizer's, the full tensors also under --fsdp. So
  a checkpoint of N ranks resumes on any number of processes, 1 included.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)))


def init_process_group(device_type: str, rank: int, world: int, local_rank: int,
                       init_method: str | None = None) -> None:
    """Join the default process group: NCCL on "cuda" (this process on GPU ``local_rank``,
    NVLink multicast off unless the user set NCCL_NVLS_ENABLE), gloo otherwise. Torn down at
    exit."""
    if device_type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world,
                                device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    atexit.register(_teardown)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class RankRows:
    """A batch sampler's batches cut to one rank's rows; its state is the sampler's own (the
    same on every rank), so a checkpoint resumes on any number of ranks."""

    def __init__(self, batches, rows: slice):
        self.batches, self.rows = batches, rows

    def next(self):
        x, y = self.batches.next()
        return x[self.rows], y[self.rows]

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def _index_keyed(state: dict, names: list[str]) -> dict:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) in
    ``optimizer.state_dict()``'s own format: keyed by position in ``names``."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in state["param_groups"]]}


def _name_keyed(state: dict, names: list[str]) -> dict:
    """The inverse of `_index_keyed`."""
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in state["param_groups"]]}


@dataclass(frozen=True)
class DataParallel:
    """Where this process stands in a data-parallel run, and what it does differently from a
    single process (see the module docstring). ``world_size == 1`` changes nothing."""
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``."""
        lo = self.rank * batch_size // self.world_size
        return slice(lo, (self.rank + 1) * batch_size // self.world_size)

    def loss_weight(self, batch_size: int) -> float:
        """What this rank's mean loss is multiplied by before the backward, so that the
        averaged gradient is that of the mean over the global batch (1 for one process)."""
        rows = self.rows(batch_size)
        return self.world_size * (rows.stop - rows.start) / batch_size

    def shard(self, batches, batch_size: int):
        """``batches`` (a sampler of global batches of ``batch_size``) cut to this rank's rows."""
        return batches if self.world_size == 1 else RankRows(batches, self.rows(batch_size))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward calls: ``model`` (one process), DDP around it, or
        ``model`` itself sharded in place by FSDP2 (before the optimizer is built on it)."""
        if self.world_size == 1:
            return model
        device = next(model.parameters()).device
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(device.type, (self.world_size,))
            # Innermost first: FSDP2 shards a module's children before the module.
            for module in reversed(list(model.modules())):
                if isinstance(module, nn.ModuleList):
                    for block in module:
                        fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        import inspect

        from torch.nn.parallel import DistributedDataParallel
        # Our models' buffers are constants (RoPE frequencies, masks): nothing to sync per
        # step (the flag's name changed in torch 2.13).
        names = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in names
                   else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None, **no_sync)

    def _reduce(self, value: float, device, op) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def global_mean(self, value: float, batch_size: int, device) -> float:
        """The mean over the global batch of a per-row mean ``value`` of this rank's rows."""
        if self.world_size == 1:
            return value
        rows = self.rows(batch_size)
        return self._reduce(value * (rows.stop - rows.start) / batch_size, device,
                            dist.ReduceOp.SUM)

    def any_rank(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is on any: a decision all ranks must share."""
        if self.world_size == 1:
            return flag
        return self._reduce(float(flag), device, dist.ReduceOp.MAX) > 0

    def seed_step(self, seed: int, step: int) -> None:
        """Reseed this rank's dropout stream from (seed, step, rank) (nothing on one process)."""
        if self.world_size > 1:
            torch.manual_seed(int(np.random.SeedSequence([seed, step, self.rank])
                                  .generate_state(1, np.uint64)[0]))

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, **kw)

    def model_state(self, model: nn.Module) -> dict:
        """``model.state_dict()`` of the whole model (rank 0's is the one to save; every rank
        must call it under --fsdp, which gathers the shards)."""
        if not self.fsdp or self.world_size == 1:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        """``opt.state_dict()`` of the whole model, in its own format (see `model_state`)."""
        if not self.fsdp or self.world_size == 1:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = get_optimizer_state_dict(model, opt, options=self._options(cpu_offload=True))
        if not self.is_main:
            return {}
        return _index_keyed(state, [n for n, _ in model.named_parameters()])

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, saved: dict) -> None:
        """Load a checkpoint's model and optimizer states (written by any number of ranks);
        every rank has read the whole checkpoint."""
        if not self.fsdp or self.world_size == 1:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_optimizer_state_dict)
        set_model_state_dict(model, saved["model"], options=self._options())
        names = [n for n, _ in model.named_parameters()]
        set_optimizer_state_dict(model, opt, _name_keyed(saved["optimizer"], names),
                                 options=self._options())
        # The group settings exactly as saved (the distributed loader turns tuples into lists,
        # e.g. AdamW's betas), as load_state_dict on one process leaves them.
        for group, saved_group in zip(opt.param_groups, saved["optimizer"]["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def meta(self) -> dict:
        """What a run's metadata adds: nothing for one process."""
        if self.world_size == 1:
            return {}
        return {"world_size": self.world_size, "data_parallel": "fsdp" if self.fsdp else "ddp"}


SINGLE = DataParallel()


def is_main_process() -> bool:
    """Whether this process is rank 0 of its run (or the only process): the one that prints."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return torchrun_world()[0] == 0


def world_size() -> int:
    """Processes in this run: the process group's, else torchrun's environment's (1 without)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return torchrun_world()[1]


def check_fsdp(fsdp: bool, world: int | None = None) -> None:
    """ValueError for --fsdp on one process (nothing to shard over)."""
    world = world_size() if world is None else world
    if fsdp and world == 1:
        raise ValueError("--fsdp: shards over the processes of torchrun; one process has "
                         "nothing to shard over (run under torchrun --nproc-per-node N > 1)")


def start(device: str, fsdp: bool = False) -> DataParallel:
    """This process's place in the run torchrun started (joining its process group unless one
    is already up, as in tests that start their own); `SINGLE` without torchrun."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world, local_rank = torchrun_world()
        if world > 1:
            device_type = torch.device(device).type
            if device_type == "cuda" and torch.device(device).index is not None:
                raise ValueError(f"--device: under torchrun each process takes the GPU of its "
                                 f"LOCAL_RANK; pass --device cuda, got {device!r}")
            init_process_group(device_type, rank, world, local_rank)
    check_fsdp(fsdp, world)
    return SINGLE if world == 1 else DataParallel(rank, world, fsdp)

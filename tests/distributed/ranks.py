"""Run a function on several CPU processes joined by a gloo process group (the tests' stand-in
for GPUs): `run_ranks(fn, world, tmp_path, *args)` returns [fn(rank, world, *args) per rank].

The processes are forked (no re-import of torch: a test stays a few seconds) and meet through a
file store in the test's own folder, so concurrent tests never fight over a port. A process
that fails re-raises its traceback here; a hang is killed after ``timeout`` seconds.
"""
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, store_file, out_dir, fn, args):
    torch.set_num_threads(1)                 # several ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                            world_size=world)
    try:
        result = fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(fn, world, tmp_path, *args, timeout=120.0):
    out_dir = tmp_path / f"ranks{world}-{time.monotonic_ns()}"
    out_dir.mkdir()
    store = out_dir / "store"
    ctx = mp.start_processes(_worker, args=(world, str(store), str(out_dir), fn, args),
                             nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks still running after {timeout} s (a hang in "
                                   f"a collective?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]

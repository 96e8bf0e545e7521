"""Multi-GPU scaling: data-parallel BDH training and context-parallel long sequences.

    python -m experiments.scaling_dist [--preset cpu|h100] [--worlds 1,2,4,8] [--out DIR]

For every world size N in --worlds, N fresh worker processes (torch.multiprocessing, meeting
through a file store; NCCL on GPUs, gloo on the CPU) run two studies:

* weak scaling of training: BDH trained with DistributedDataParallel (`experiments.distributed`)
  on random tokens, --rank-batch sequences of --block-size per rank (the per-rank batch is
  fixed, so the global batch grows with N). tokens/s = N · rank_batch · block_size / the median
  step time (a step: forward, backward with the gradient all-reduce, AdamW); efficiency =
  tokens/s at N / (N × tokens/s at 1).
* context parallelism: forward + backward of `kernels.distributed.hebbian_attention_cp` over one
  sequence of T tokens split evenly over the N ranks, at BDH's attention shape (--cp-heads
  heads, K = --cp-neurons per head, V = --cp-dim shared by the heads, q = k as in BDH). The
  lengths of --cp-lengths run shortest first until one runs out of memory on some rank: that
  ends the sweep of this N, and the longest T that ran is what N devices can train (one device:
  the memory limit the split removes).

Timing: `experiments.harness.time_call` with a fixed count of calls on every rank (a collective
needs every rank to make the same calls): the median per rank, the slowest rank reported.
Memory: the peak on each rank (CUDA: max_memory_allocated; CPU: the process's resident set),
the largest rank reported. An out-of-memory error on any rank ends that N's context sweep (its
processes are stopped: the others wait in a collective that cannot finish); another error is
recorded as such.

Outputs DIR/scaling_dist.json ({"meta", "train", "cp"}), DIR/scaling_dist.md (tables, also
printed) and DIR/scaling_dist.png (tokens/s and efficiency against N; fwd+bwd time and peak
memory against T per N). DIR defaults to runs/scaling_dist (gitignored).

The CPU preset (1 and 2 processes, tiny shapes) takes 15 to 30 s on a 2-core CPU shared with
other work (measured). The GPU run, on a host with 8 GPUs:

    python -m experiments.scaling_dist --preset h100
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .distributed import DataParallel, init_process_group
from .harness import (Choice, Device, Flag, Float, Int, Ints, OutDir, PeakMemory, TimingPolicy,
                      commit_label, default_out, free_memory, is_oom, markdown_table, option,
                      parse_config, run_meta, save_figure, time_call, train_step, write_json,
                      write_text)
from .train import BDH_OVERRIDES


@dataclass
class ScalingDistConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu or cuda (GPU i: rank i)"))
    worlds: tuple = field(default=(1, 2), metadata=option(
        Ints(1), "world sizes (processes, one GPU each on CUDA)"))
    bdh: dict = field(default_factory=dict, metadata=option(
        BDH_OVERRIDES, "BDHConfig fields of the trained model", shown="the preset's"))
    rank_batch: int = field(default=4, metadata=option(Int(1), "sequences per rank per step"))
    block_size: int = field(default=64, metadata=option(Int(1), "tokens per training sequence"))
    steps: int = field(default=3, metadata=option(Int(1), "timed training steps"))
    cp_lengths: tuple = field(default=(2048, 8192), metadata=option(
        Ints(1), "sequence lengths of the context-parallel sweep, shortest first"))
    cp_heads: int = field(default=2, metadata=option(Int(1), "heads of the attention"))
    cp_neurons: int = field(default=256, metadata=option(Int(1), "K: neurons per head"))
    cp_dim: int = field(default=32, metadata=option(Int(1), "V: the value width (BDH's D)"))
    cp_reps: int = field(default=3, metadata=option(Int(1), "timed fwd+bwd calls per length"))
    dtype: str = field(default="float32", metadata=option(
        Choice(("float32", "bfloat16")), "the attention inputs' dtype (and training autocast)"))
    append: bool = field(default=False, metadata=option(
        Flag(), "keep the points of other world sizes already in DIR/scaling_dist.json (a "
                "sweep split over several commands)"))
    timeout_s: float = field(default=240.0, metadata=option(
        Float(1), "stop a world size's processes after this many seconds"))
    out: str = field(default=default_out("scaling_dist"), metadata=option(
        OutDir(), "output folder"))


PRESETS = {
    # Tiny shapes on 1 and 2 CPU processes: the whole run in about a minute.
    "cpu": dict(device="cpu", worlds=(1, 2),
                bdh=dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16,
                         dropout=0.0),
                rank_batch=4, block_size=64, steps=3, cp_lengths=(2048, 8192), cp_heads=2,
                cp_neurons=256, cp_dim=32, cp_reps=3, dtype="float32", timeout_s=240.0),
    # The official BDH (25M) at T = 512, bf16; BDH's attention shape (4 heads × 8192 neurons,
    # D = 256) from 64k to 1M tokens.
    "h100": dict(device="cuda", worlds=(1, 2, 4, 8), bdh=dict(dropout=0.0), rank_batch=16,
                 block_size=512, steps=10, cp_lengths=tuple(65536 * 2 ** i for i in range(5)),
                 cp_heads=4, cp_neurons=8192, cp_dim=256, cp_reps=3, dtype="bfloat16",
                 timeout_s=540.0),
}

def fixed_calls(reps: int) -> TimingPolicy:
    """One untimed call, then exactly ``reps`` timed ones: every rank makes the same calls (a
    collective inside would wait forever for a rank that stopped early)."""
    return TimingPolicy(warmup=1, min_reps=reps, max_reps=reps, budget_s=0.0, stepwise=True)


def _slowest(value: float, device) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def train_point(cfg: ScalingDistConfig, dp: DataParallel, device) -> dict:
    """Tokens/s of BDH training at this world size (weak scaling)."""
    from bdh import BDH, BDHConfig
    torch.manual_seed(0)
    model = BDH(BDHConfig(**cfg.bdh)).to(device)
    forward = dp.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(dp.rank)
    tokens = torch.randint(0, 256, (cfg.rank_batch, cfg.block_size + 1), generator=gen)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and cfg.dtype == "bfloat16")
    step = train_step(forward, opt, x, y, autocast)
    with PeakMemory(device) as mem:
        timing = time_call(step, device, policy=fixed_calls(cfg.steps))
    ms = _slowest(timing.median_ms, device)
    return {"world": dp.world_size, "step_ms": ms,
            "tok_s": dp.world_size * cfg.rank_batch * cfg.block_size / (ms / 1e3),
            "peak_bytes": int(_slowest(mem.peak, device)),
            "params": sum(p.numel() for p in model.parameters())}


def cp_point(cfg: ScalingDistConfig, T: int, rank: int, world: int, device) -> dict:
    """Forward + backward of one sequence of T tokens split over the ranks."""
    from kernels.distributed import hebbian_attention_cp, split_lengths
    L = split_lengths(T, world)[rank]
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device=device).manual_seed(rank)
    qk = torch.randn(1, cfg.cp_heads, L, cfg.cp_neurons, generator=gen, device=device,
                     dtype=dtype).relu_().requires_grad_()       # BDH's q = k: ReLU features
    v = torch.randn(1, 1, L, cfg.cp_dim, generator=gen, device=device,
                    dtype=dtype).requires_grad_()
    do = torch.randn(1, cfg.cp_heads, L, cfg.cp_dim, generator=gen, device=device, dtype=dtype)

    def fwd_bwd():
        o, _ = hebbian_attention_cp(qk, qk, v, scale=1.0, strict=True)
        o.backward(do)

    with PeakMemory(device) as mem:
        timing = time_call(fwd_bwd, device, grad_to_none=[qk, v],
                           policy=fixed_calls(cfg.cp_reps))
    return {"world": world, "T": T, "tokens_per_rank": L, "oom": False,
            "ms": _slowest(timing.median_ms, device),
            "peak_bytes": int(_slowest(mem.peak, device))}


def _worker(rank: int, world: int, cfg: ScalingDistConfig, folder: str) -> None:
    """One rank of world size ``world``: the training point, then the context sweep; rank 0
    writes each result as a JSON file in ``folder`` as soon as it has it."""
    folder = Path(folder)
    device_type = torch.device(cfg.device).type
    if device_type == "cpu":
        # One thread per rank: on a shared CPU the intra-op threads' barriers cost more than
        # these small shapes gain, and every world size then gets the same per-rank compute.
        torch.set_num_threads(1)
    init_process_group(device_type, rank, world, rank, init_method=f"file://{folder / 'store'}")
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    dp = DataParallel(rank, world)

    def record(name, obj):
        if rank == 0:
            write_json(folder / f"{name}.json", obj)

    record("train", train_point(cfg, dp, device))
    free_memory(device)
    for T in cfg.cp_lengths:
        record("trying", {"T": T})
        dist.barrier()                   # no rank starts T before rank 0 has said it is trying T
        record(f"cp_{T}", cp_point(cfg, T, rank, world, device))
        free_memory(device)
    if rank == 0:
        (folder / "trying.json").unlink(missing_ok=True)


def run_world(cfg: ScalingDistConfig, world: int, folder: Path) -> tuple[dict | None, list]:
    """The training point and the context sweep of one world size, in its own processes."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    failure = None
    # CUDA cannot be forked; on the CPU a fork saves re-importing torch in every rank.
    method = "spawn" if torch.device(cfg.device).type == "cuda" else "fork"
    ctx = mp.start_processes(_worker, args=(world, cfg, str(folder)), nprocs=world, join=False,
                             start_method=method)
    deadline = time.monotonic() + cfg.timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                failure = f"timeout after {cfg.timeout_s:g} s"
                break
    except Exception as e:                           # noqa: BLE001 — a rank failed: data
        failure = f"{type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    read = lambda name: json.loads((folder / f"{name}.json").read_text())   # noqa: E731
    train = read("train") if (folder / "train.json").exists() else None
    points = [read(f"cp_{T}") for T in cfg.cp_lengths if (folder / f"cp_{T}.json").exists()]
    if failure is not None:
        oom = is_oom(RuntimeError(failure))
        failed = {"world": world, "oom": oom, **({} if oom else {"error": failure[-2000:]})}
        if train is None:
            train = {**failed, "tok_s": None}
        else:
            T = read("trying")["T"] if (folder / "trying.json").exists() else None
            points.append({**failed, "T": T, "ms": None, "peak_bytes": None})
    return train, points


def run(cfg: ScalingDistConfig) -> dict:
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    meta = run_meta(device, config=asdict(cfg))
    if device.type == "cuda":
        meta["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        meta["gpus_visible"] = torch.cuda.device_count()
    result = {"meta": meta, "train": [], "cp": []}
    if cfg.append and (out / "scaling_dist.json").exists():
        earlier = json.loads((out / "scaling_dist.json").read_text())
        for key in ("train", "cp"):
            result[key] = [p for p in earlier[key] if p["world"] not in cfg.worlds]
        meta["earlier_runs"] = earlier["meta"].get("earlier_runs", []) + [
            {k: earlier["meta"].get(k) for k in ("date", "commit", "device")}]
    for world in cfg.worlds:
        if device.type == "cuda" and world > torch.cuda.device_count():
            result["meta"].setdefault("skipped_worlds", []).append(world)
            continue
        print(f"world size {world}: training, then context parallelism over "
              f"{','.join(map(str, cfg.cp_lengths))} tokens")
        train, points = run_world(cfg, world, out / "work" / f"world{world}")
        result["train"] = sorted(result["train"] + [train], key=lambda p: p["world"])
        result["cp"] = sorted(result["cp"] + points, key=lambda p: (p["world"], p.get("T") or 0))
        add_efficiency(result["train"])
        write_json(out / "scaling_dist.json", result)
    text = markdown(result)
    write_text(out / "scaling_dist.md", text)
    plot(result, out / "scaling_dist.png")
    write_json(out / "scaling_dist.json", result)
    return result


def add_efficiency(train: list[dict]) -> None:
    """Weak-scaling efficiency of every point: tokens/s at N / (N × tokens/s at 1)."""
    one = next((p["tok_s"] for p in train if p["world"] == 1), None)
    for p in train:
        p["efficiency"] = None if not one or p["tok_s"] is None else \
            p["tok_s"] / (p["world"] * one)


def longest(points: list[dict]) -> dict[int, dict]:
    """Per world size: the longest T that ran and the first that did not (None: all ran)."""
    out = {}
    for p in points:
        if "T" not in p:
            continue
        w = out.setdefault(p["world"], {"longest_T": None, "first_failed_T": None})
        if p.get("ms") is not None:
            w["longest_T"] = max(w["longest_T"] or 0, p["T"])
        elif w["first_failed_T"] is None:
            w["first_failed_T"] = p["T"]
    return out


def markdown(result: dict) -> str:
    meta, cfg = result["meta"], result["meta"]["config"]
    lines = [f"# Multi-device scaling ({meta['device']}, {commit_label(meta)})", "",
             f"## Weak scaling of BDH training ({cfg['rank_batch']} × {cfg['block_size']} "
             f"tokens per rank per step)", "",
             markdown_table([{"devices": p["world"], "step ms": p.get("step_ms"),
                              "tokens/s": p["tok_s"], "efficiency": p.get("efficiency"),
                              "peak GiB / rank": p["peak_bytes"] / 2 ** 30 if p.get(
                                  "peak_bytes") else ("OOM" if p.get("oom") else "error")}
                             for p in result["train"]]), "",
             f"## Context parallelism: Hebbian attention fwd+bwd over one sequence "
             f"(H={cfg['cp_heads']}, K={cfg['cp_neurons']}, V={cfg['cp_dim']}, "
             f"{cfg['dtype']})", ""]
    worlds = sorted({p["world"] for p in result["cp"]})
    Ts = sorted({p["T"] for p in result["cp"] if p.get("T") is not None})
    rows = []
    for T in Ts:
        row = {"T": T}
        for w in worlds:
            p = next((p for p in result["cp"] if p["world"] == w and p.get("T") == T), None)
            row[f"{w} dev ms"] = (None if p is None else "OOM" if p["oom"] else
                                  "error" if p.get("ms") is None else p["ms"])
            row[f"{w} dev GiB"] = None if p is None or p.get("peak_bytes") is None else \
                p["peak_bytes"] / 2 ** 30
        rows.append(row)
    lines += [markdown_table(rows), "", "Longest sequence trained per device count:", ""]
    lines += [markdown_table([{"devices": w, **v} for w, v in sorted(longest(
        result["cp"]).items())]), ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    train = sorted((p for p in result["train"] if p["tok_s"]), key=lambda p: p["world"])
    if train:
        ws = [p["world"] for p in train]
        axes[0].plot(ws, [p["tok_s"] for p in train], "-o", label="measured")
        axes[0].plot(ws, [w * train[0]["tok_s"] / train[0]["world"] for w in ws], "--",
                     label="linear")
        axes[0].legend()
    axes[0].set(xlabel="devices", ylabel="tokens/s", title="BDH training (weak scaling)",
                xscale="log", xticks=[p["world"] for p in train],
                xticklabels=[str(p["world"]) for p in train])
    for w in sorted({p["world"] for p in result["cp"]}):
        ok = [p for p in result["cp"] if p["world"] == w and p.get("ms") is not None]
        if ok:
            axes[1].plot([p["T"] for p in ok], [p["ms"] for p in ok], "-o", label=f"{w} dev")
            axes[2].plot([p["T"] for p in ok], [p["peak_bytes"] / 2 ** 30 for p in ok], "-o",
                         label=f"{w} dev")
        for p in result["cp"]:
            if p["world"] == w and p.get("oom"):
                axes[2].axvline(p["T"], ls=":", color=axes[2].lines[-1].get_color()
                                if axes[2].lines else "k")
    limit = result["meta"].get("device_memory_bytes")
    if limit:
        axes[2].axhline(limit / 2 ** 30, color="k", ls="--", label="one device's memory")
    for ax, title, unit in ((axes[1], "context parallel fwd+bwd", "ms"),
                            (axes[2], "peak memory per device (dotted: OOM)", "GiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=unit, title=title)
        if ax.lines:
            ax.legend()
    meta = result["meta"]
    fig.suptitle(f"multi-device scaling — {meta['device']}, {commit_label(meta)}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def config_from_args(argv=None) -> ScalingDistConfig:
    return parse_config(ScalingDistConfig, PRESETS, argv,
                        prog="python -m experiments.scaling_dist",
                        description=__doc__.split("\n\n")[0])


def main(argv=None) -> dict:
    cfg = config_from_args(argv)
    result = run(cfg)
    print(markdown(result))
    print(f"wrote {Path(cfg.out) / 'scaling_dist.json'}, scaling_dist.md, scaling_dist.png")
    return result


if __name__ == "__main__":
    main()

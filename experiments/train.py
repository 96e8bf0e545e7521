"""Train BDH or a parameter-matched GPT-2 on the offline Shakespeare corpus.

    python -m experiments.train --model bdh|gpt2|bsbr [--preset cpu|h100] [--steps N] [--out DIR]
                                [--ckpt-dir DIR] [--resume] [--max-minutes M] [--compile]
                                [--bdh n_layer=2,n_embd=64] ...

The log goes to DIR/train_log.json and the checkpoint to DIR/ckpt/<model>.pt (DIR defaults to
runs/train/<model>, gitignored), so every run can be continued with --resume.

A config dataclass and one plain loop (nanoGPT-style): AdamW, bf16 autocast on CUDA, gradient
accumulation, optional torch.compile and gradient checkpointing (BDH), validation loss on fixed
held-out batches (plus, for BDH, the per-layer densities of xs, ys, xy on those batches), atomic
checkpoints that resume the exact loss curve (model, optimizer, batch sampler and RNG states are
all saved), a time limit for runs split over several sessions, a tqdm bar and a JSON log. The
GPT-2 is sized to the BDH of the same preset by parameter count.

The default CPU run (300 steps of a 0.2M-parameter BDH, one torch thread) takes 20 to 45 s
(measured on a 2-core CPU shared with other work).
"""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .data import ByteBatcher, load_corpus
from .harness import (Choice, Device, Flag, Float, Int, KeyValues, Optional, OutDir, Stopwatch,
                      default_out, load_torch, option, parse_config, run_meta, save_torch,
                      threads_field, torch_threads, validate, write_json)

EVAL_SEED = 10_000          # the validation batches: the same ones at every eval, in every run


def bdh_fields() -> list[str]:
    """The BDHConfig fields --bdh may set."""
    from bdh import BDHConfig
    return [f.name for f in dataclasses.fields(BDHConfig) if f.name != "gradient_checkpointing"]


def check_bdh(fields: dict) -> None:
    """Raise as BDHConfig does for fields it refuses."""
    from bdh import BDHConfig
    BDHConfig(**fields)


BDH_OVERRIDES = KeyValues(bdh_fields, check_bdh)


@dataclass
class TrainConfig:
    model: str = field(default="bdh", metadata=option(
        Choice(("bdh", "gpt2", "bsbr")),
        "BDH, or a GPT-2 or BSBR LM matched to the preset's BDH by parameter count"))
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu, cuda or cuda:i"))
    threads: int | None = threads_field()
    steps: int = field(default=300, metadata=option(
        Int(1), "optimizer steps in all (a resumed run continues up to this many)"))
    batch_size: int = field(default=8, metadata=option(
        Int(1), "sequences per micro-batch (under torchrun the global one: each process takes "
                "its share)"))
    block_size: int = field(default=64, metadata=option(Int(1), "bytes per training sequence"))
    grad_accum: int = field(default=1, metadata=option(Int(1), "micro-batches per optimizer step"))
    lr: float = field(default=1e-3, metadata=option(Float(0, lo_open=True), "AdamW learning rate"))
    weight_decay: float = field(default=0.1, metadata=option(Float(0), "AdamW weight decay"))
    eval_every: int = field(default=50, metadata=option(
        Int(1), "steps between validation evaluations"))
    eval_batches: int = field(default=4, metadata=option(
        Int(1), "validation batches per evaluation (the same ones every time)"))
    log_every: int = field(default=10, metadata=option(
        Int(1), "steps between training-loss log entries"))
    seed: int = field(default=1337, metadata=option(
        Int(0), "seed of the model initialisation, batch sampler and dropout"))
    autocast: str = field(default="none", metadata=option(
        Choice(("none", "bfloat16")), "'none' or 'bfloat16' (autocast on CUDA)"))
    compile: bool = field(default=False, metadata=option(
        Flag(), "torch.compile the training forward"))
    grad_checkpoint: bool = field(default=False, metadata=option(
        Flag(), "gradient checkpointing of the BDH layers (less memory, more compute)"))
    fsdp: bool = field(default=False, metadata=option(
        Flag(), "under torchrun: shard parameters, gradients and optimizer state over the "
                "processes (FSDP2) instead of replicating them (DDP)"))
    out: str | None = field(default=None, metadata=option(
        Optional(OutDir()), "folder of the JSON log (train_log.json)",
        shown="runs/train/<model>"))
    ckpt_dir: str | None = field(default=None, metadata=option(
        Optional(OutDir()), "folder of the checkpoint <model>.pt that --resume continues from",
        shown="<out>/ckpt"))
    ckpt_every: int = field(default=0, metadata=option(
        Int(0), "also checkpoint every this many steps (0: only at the end and when "
                "--max-minutes stops the run)"))
    resume: bool = field(default=False, metadata=option(
        Flag(), "continue from the checkpoint in --ckpt-dir (from step 0 if there is none)"))
    max_minutes: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "stop cleanly, with a checkpoint, after this many minutes; rerun "
                            "the same command with --resume to continue", shown="no limit"))
    bdh: dict = field(default_factory=dict, metadata=option(
        BDH_OVERRIDES, "BDHConfig fields over the preset's, e.g. n_layer=2,n_embd=64 (for "
                       "--model gpt2: the BDH whose parameter count the GPT-2 matches)",
        shown="the preset's"))

    def check(self) -> None:
        if (self.resume or self.max_minutes is not None) and not self.ckpt_dir:
            raise ValueError("--ckpt-dir: --resume and --max-minutes need a folder for the "
                             "checkpoint that carries the run across sessions, got none")
        distributed.check_fsdp(self.fsdp)


PRESETS = {
    "cpu": dict(device="cpu", threads=1, steps=300, batch_size=8, block_size=64, lr=3e-3,
                eval_every=50, eval_batches=4, log_every=10, autocast="none",
                bdh=dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16,
                         dropout=0.1)),
    # The official pathwaycom/bdh train.py setting.
    "h100": dict(device="cuda", steps=3000, batch_size=32, block_size=512, lr=1e-3,
                 weight_decay=0.1, eval_every=250, eval_batches=8, log_every=50,
                 autocast="bfloat16", ckpt_every=250, bdh=dict()),
}

# Settings a checkpoint must agree on to resume the same run (steps, eval cadence, compile,
# time limit and paths may change between sessions).
RESUME_MUST_MATCH = ("model", "bdh", "batch_size", "block_size", "grad_accum", "lr",
                     "weight_decay", "seed", "autocast")


# ----------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig):
    """(model, info) for cfg.model; the GPT-2 and BSBR LMs are matched to the preset's BDH by
    parameter count."""
    from bdh import BDH, BDHConfig
    torch.manual_seed(cfg.seed)
    bdh_cfg = BDHConfig(**cfg.bdh, gradient_checkpointing=cfg.grad_checkpoint)
    if cfg.model == "bdh":
        model = BDH(bdh_cfg)
        info = {"bdh_config": asdict(bdh_cfg)}
    elif cfg.model == "gpt2":
        from baselines import GPT2LM, match_gpt2_config
        bdh_params = sum(p.numel() for p in BDH(bdh_cfg).parameters())
        # As many blocks as BDH has layers; the width is what matches the parameter count.
        gcfg = match_gpt2_config(bdh_params, n_layer=bdh_cfg.n_layer,
                                 head_dim=64 if bdh_cfg.n_embd >= 128 else 32,
                                 n_positions=cfg.block_size, dropout=bdh_cfg.dropout)
        torch.manual_seed(cfg.seed)
        model = GPT2LM(gcfg)
        info = {"gpt2_config": {k: getattr(gcfg, k) for k in
                                ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
                "matched_to_bdh_params": bdh_params}
    else:
        from bsbr import BSBRLM, match_bsbr_config
        bdh_params = sum(p.numel() for p in BDH(bdh_cfg).parameters())
        bcfg = match_bsbr_config(bdh_params, n_layer=bdh_cfg.n_layer, n_head=bdh_cfg.n_head,
                                 block_size=cfg.block_size, dropout=bdh_cfg.dropout)
        torch.manual_seed(cfg.seed)
        model = BSBRLM(bcfg)
        info = {"bsbr_config": asdict(bcfg), "matched_to_bdh_params": bdh_params}
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.to(cfg.device), info


def _rng_state(device):
    st = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st, device):
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def autocast_context(cfg: TrainConfig):
    if cfg.autocast == "bfloat16" and torch.device(cfg.device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def evaluate(model, val: bytes, cfg: TrainConfig, ctx) -> dict:
    """Mean loss over the same ``eval_batches`` validation batches every time (fixed seed).
    For BDH also the per-layer densities (fraction > 0) of xs, ys, xy over those batches."""
    was_training = model.training
    model.eval()
    batches = ByteBatcher(val, cfg.block_size, cfg.batch_size, seed=EVAL_SEED, device=cfg.device)
    probe = nullcontext()
    if cfg.model == "bdh":
        from bdh import SparsityProbe
        probe = SparsityProbe(model)
    total = 0.0
    with probe:
        for _ in range(cfg.eval_batches):
            x, y = batches.next()
            with ctx:
                _, loss = model(x, y)
            total += float(loss)
    model.train(was_training)
    out = {"loss": total / cfg.eval_batches}
    if cfg.model == "bdh":
        out["densities"] = probe.densities()
    return out


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_path(cfg: TrainConfig) -> Path | None:
    return Path(cfg.ckpt_dir) / f"{cfg.model}.pt" if cfg.ckpt_dir else None


def read_checkpoint(cfg: TrainConfig) -> dict | None:
    """The checkpoint --resume continues from (None without --resume or without a file), read
    on the CPU (the RNG and sampler states must stay CPU ByteTensors); refused when it was
    written with other settings."""
    ckpt = checkpoint_path(cfg)
    if not cfg.resume or ckpt is None or not ckpt.exists():
        if cfg.resume:
            print(f"--resume: no checkpoint at {ckpt}; starting {cfg.model} from step 0")
        return None
    saved = load_torch(ckpt, "training checkpoint", map_location="cpu",
                       fix="delete it to train from step 0, or restore a good copy")
    diff = [k for k in RESUME_MUST_MATCH if saved["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise SystemExit(f"--resume: {ckpt} was written with other settings: " + ", ".join(
            f"{k}={saved['config'].get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
    return saved


class Run:
    """One training session: the model, its optimizer, the batch sampler and the log, with
    the few things the loop does besides stepping (evaluate, call the hook, save)."""

    def __init__(self, cfg: TrainConfig, corpus: dict, hook, saved: dict | None):
        self.cfg, self.corpus, self.hook = cfg, corpus, hook
        # Under torchrun: this rank's place (one process: changes nothing; see distributed).
        self.dp = distributed.start(cfg.device, cfg.fsdp)
        self.device = torch.device(cfg.device)
        self.model, info = build_model(cfg)
        trained = self.dp.wrap(self.model)          # before the optimizer: FSDP shards in place
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay,
                                     fused=self.device.type == "cuda")
        self.batches = self.dp.shard(ByteBatcher(corpus["train"], cfg.block_size,
                                                 cfg.batch_size, seed=cfg.seed,
                                                 device=cfg.device), cfg.batch_size)
        self.ctx = autocast_context(cfg)
        meta = run_meta(cfg.device, config=asdict(cfg), **info, **self.dp.meta())
        self.log = {"meta": meta, "train": [], "val": [], "sessions": [], "status": "running"}
        self.step = 0
        if saved is not None:
            # load_state_dict copies weights and optimizer state onto the parameters' device.
            self.dp.load(self.model, self.opt, saved)
            self.batches.load_state_dict(saved["batches"])
            _set_rng_state(saved["rng"], self.device)
            self.log, self.step = saved["log"], saved["step"]
            self.log.setdefault("sessions", [])
        # Each session (a first run, then every --resume) says where and from which step it ran.
        self.log["sessions"].append({"start_step": self.step, "date": meta["date"],
                                     "device": meta["device"], "commit": meta["commit"],
                                     **self.dp.meta()})
        self.forward = torch.compile(trained) if cfg.compile else trained

    def finished(self) -> bool:
        return self.log["status"] == "finished" and self.step >= self.cfg.steps

    def save(self, status: str) -> None:
        log, cfg = self.log, self.cfg
        log["status"] = status
        log["sessions"][-1]["end_step"] = self.step
        if self.device.type == "cuda":
            log["meta"]["peak_memory_bytes"] = max(log["meta"].get("peak_memory_bytes", 0),
                                                   torch.cuda.max_memory_allocated(self.device))
        ckpt = checkpoint_path(cfg)
        if ckpt is not None:
            # Every rank gathers (under FSDP the states are sharded); rank 0 writes.
            state = {"model": self.dp.model_state(self.model),
                     "optimizer": self.dp.optimizer_state(self.model, self.opt)}
            if self.dp.is_main:
                save_torch({**state, "batches": self.batches.state_dict(),
                            "rng": _rng_state(self.device), "step": self.step, "log": log,
                            "config": asdict(cfg)}, ckpt)
        if cfg.out and self.dp.is_main:
            write_json(Path(cfg.out) / "train_log.json", log)

    def call_hook(self) -> None:
        if self.hook is not None:
            self.model.eval()
            with torch.no_grad():
                self.hook(self.step, self.model, self.log)
            self.model.train()

    def evaluate(self) -> None:
        if self.log["val"] and self.log["val"][-1]["step"] == self.step:
            return                       # already done (a finished run extended with --steps)
        self.log["val"].append({"step": self.step, **evaluate(self.model, self.corpus["val"],
                                                              self.cfg, self.ctx)})
        if self.cfg.out and self.dp.is_main:    # the log on disk grows as the run goes
            write_json(Path(self.cfg.out) / "train_log.json", self.log)

    def train_step(self) -> float:
        """One optimizer step (all micro-batches); returns the mean loss."""
        cfg, loss_sum = self.cfg, 0.0
        self.dp.seed_step(cfg.seed, self.step)
        weight = self.dp.loss_weight(cfg.batch_size)    # 1 on one process
        for _ in range(cfg.grad_accum):
            x, y = self.batches.next()
            with self.ctx:
                _, loss = self.forward(x, y)
            (loss * weight / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        loss_sum = self.dp.global_mean(loss_sum, cfg.batch_size, self.device)
        if not math.isfinite(loss_sum):
            self.save("diverged")
            raise RuntimeError(f"loss is {loss_sum} at step {self.step}; checkpoint kept")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum

    def log_train(self, loss: float, tok_s: float) -> None:
        tokens = self.cfg.batch_size * self.cfg.block_size * self.cfg.grad_accum
        entry = {"step": self.step, "loss": loss, "tok_s": tok_s, "tokens": self.step * tokens}
        if self.device.type == "cuda":
            entry["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log["train"].append(entry)


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, corpus: dict | None = None, hook=None,
          deadline: float | None = None) -> dict:
    """Train per ``cfg``; returns the log. ``hook(step, model, log)`` is called before the
    update of every step (step 0: the initial model) and once after the last step (with
    step == cfg.steps), in eval mode and under no_grad; it may add to the log.

    The run stops cleanly (checkpoint, status "interrupted") once ``time.time()`` passes
    ``deadline``, or ``cfg.max_minutes`` after this call when no deadline is given."""
    validate(cfg)
    if deadline is None and cfg.max_minutes is not None:
        deadline = time.time() + 60 * cfg.max_minutes
    saved = read_checkpoint(cfg)
    if saved is not None and saved["log"]["status"] == "finished" \
            and saved["step"] >= cfg.steps:
        return saved["log"]                             # nothing left to do
    corpus = corpus if corpus is not None else load_corpus("shakespeare")
    with torch_threads(cfg.threads):
        run = Run(cfg, corpus, hook, saved)
        if saved is not None:
            run.log["status"] = "running"
            if run.dp.is_main:
                print(f"resuming {cfg.model} from {checkpoint_path(cfg)} at step {run.step}")
        return loop(run, deadline)


def loop(run: Run, deadline: float | None) -> dict:
    """Step ``run`` up to its config's steps (or the deadline); returns its log."""
    cfg = run.cfg
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    seconds, tokens = 0.0, 0                # tok/s counts training steps only, not evals/hooks
    run.model.train()
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {cfg.model}", unit="step",
               disable=not run.dp.is_main)
    while run.step < cfg.steps:
        if deadline is not None and run.dp.any_rank(time.time() > deadline, run.device):
            run.save("interrupted")
            bar.close()
            print(f"{cfg.model}: time limit reached at step {run.step}; checkpoint in "
                  f"{checkpoint_path(cfg)}; rerun the same command with --resume to continue")
            return run.log
        run.call_hook()
        if run.step % cfg.eval_every == 0:
            run.evaluate()
        with Stopwatch(run.device) as sw:
            loss = run.train_step()
        seconds, tokens = seconds + sw.seconds, tokens + tokens_per_step
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            run.log_train(loss, tokens / max(seconds, 1e-9))
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / max(seconds, 1e-9):,.0f}")
            seconds, tokens = 0.0, 0
        bar.update(1)
        if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
            run.save("running")
    bar.close()
    run.call_hook()
    run.evaluate()
    run.save("finished")
    return run.log


# ----------------------------------------------------------------------------- CLI

def with_default_paths(cfg: TrainConfig) -> None:
    """The log defaults to runs/train/<model> and the checkpoint to <out>/ckpt, so every run
    can be resumed."""
    if cfg.out is None:
        cfg.out = default_out(f"train/{cfg.model}")
    if cfg.ckpt_dir is None:
        cfg.ckpt_dir = str(Path(cfg.out) / "ckpt")


def config_from_args(argv=None) -> TrainConfig:
    """The TrainConfig of a command line: the preset, then the flags given, every one checked."""
    return parse_config(TrainConfig, PRESETS, argv, prog="python -m experiments.train",
                        description=__doc__.split("\n\n")[0], derive=with_default_paths)


def summary(cfg: TrainConfig, log: dict) -> str:
    meta = log["meta"]
    last = log["train"][-1] if log["train"] else {}
    val = log["val"][-1] if log["val"] else {}
    size = f"{meta['params']:,} params"
    if "matched_to_bdh_params" in meta:
        size += f" (matched to BDH's {meta['matched_to_bdh_params']:,})"
    lines = [f"{cfg.model}: {size}, status {log['status']} at step {last.get('step', 0)}, "
             f"train loss {last.get('loss', float('nan')):.4f}, "
             f"val loss {val.get('loss', float('nan')):.4f}, {last.get('tok_s', 0):,.0f} tok/s"
             + (f", peak {meta['peak_memory_bytes'] / 2**20:,.0f} MiB"
                if "peak_memory_bytes" in meta else "")]
    if val.get("densities"):
        lines.append("  densities (xs/ys/xy) per layer: " + "; ".join(
            f"L{i} {d['xs']:.3f}/{d['ys']:.3f}/{d['xy']:.3f}"
            for i, d in enumerate(val["densities"])))
    lines.append(f"  log: {cfg.out}/train_log.json; checkpoint: {cfg.ckpt_dir}/{cfg.model}.pt "
                 f"(continue with --resume)")
    return "\n".join(lines)


def main(argv=None, corpus=None) -> dict:
    cfg = config_from_args(argv)
    log = train(cfg, corpus)
    if distributed.is_main_process():
        print(summary(cfg, log))
    return log


if __name__ == "__main__":
    main()

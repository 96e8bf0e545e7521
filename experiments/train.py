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
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .data import ByteBatcher, load_corpus
from .results import default_out, load_torch, run_meta, save_torch, write_json

EVAL_SEED = 10_000          # the validation batches: the same ones at every eval, in every run


@dataclass
class TrainConfig:
    model: str = "bdh"                 # "bdh" | "gpt2" | "bsbr"
    preset: str = "cpu"
    device: str = "cpu"
    steps: int = 300
    batch_size: int = 8
    block_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 1337
    autocast: str = "none"             # "none" | "bfloat16" (CUDA)
    compile: bool = False
    grad_checkpoint: bool = False
    out: str | None = None
    ckpt_dir: str | None = None
    ckpt_every: int = 0                # 0: only at the end (and when --max-minutes stops it)
    resume: bool = False
    max_minutes: float | None = None
    bdh: dict = field(default_factory=dict)   # BDHConfig overrides (--bdh k=v,...)


PRESETS = {
    "cpu": dict(device="cpu", steps=300, batch_size=8, block_size=64, lr=3e-3, eval_every=50,
                eval_batches=4, log_every=10, autocast="none",
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


def build_model(cfg: TrainConfig):
    """(model, info) for cfg.model; the GPT-2 is matched to the preset's BDH by parameters."""
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
    elif cfg.model == "bsbr":
        from bsbr import BSBRLM
        bdh_params = sum(p.numel() for p in BDH(bdh_cfg).parameters())
        bcfg = match_bsbr_config(bdh_params, n_layer=bdh_cfg.n_layer, n_head=bdh_cfg.n_head,
                                 block_size=cfg.block_size, dropout=bdh_cfg.dropout)
        torch.manual_seed(cfg.seed)
        model = BSBRLM(bcfg)
        info = {"bsbr_config": asdict(bcfg), "matched_to_bdh_params": bdh_params}
    else:
        raise ValueError(f"--model: expected 'bdh', 'gpt2' or 'bsbr', got {cfg.model!r}")
    info["params"] = sum(p.numel() for p in model.parameters())
    return model.to(cfg.device), info


def match_bsbr_config(target_params: int, *, n_layer: int, n_head: int, block_size: int,
                      dropout: float):
    """The BSBR LM with ``n_layer`` blocks whose width (a multiple of 8·n_head) brings its
    parameter count closest to ``target_params``. Chunks of block_size/8 tokens (at least 8)
    and top-k 4, so a training block holds several completed chunks to route between."""
    from bsbr import BSBRLM, BSBRLMConfig

    def make(d):
        return BSBRLMConfig(n_layer=n_layer, d_model=d, n_head=n_head,
                            chunk_size=max(8, block_size // 8), top_k=4, dropout=dropout)

    def count(d):
        with torch.device("meta"):
            return sum(p.numel() for p in BSBRLM(make(d)).parameters())

    step = 8 * n_head
    return make(min(range(step, 64 * step + 1, step), key=lambda d: abs(count(d) - target_params)))


def _rng_state(device):
    st = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st, device):
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


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


def train(cfg: TrainConfig, corpus: dict | None = None, hook=None,
          deadline: float | None = None) -> dict:
    """Train per ``cfg``; returns the log. ``hook(step, model, log)`` is called before the
    update of every step (step 0: the initial model) and once after the last step (with
    step == cfg.steps), in eval mode and under no_grad; it may add to the log.

    The run stops cleanly (checkpoint, status "interrupted") once ``time.time()`` passes
    ``deadline``, or ``cfg.max_minutes`` after this call when no deadline is given."""
    if deadline is None and cfg.max_minutes is not None:
        deadline = time.time() + 60 * cfg.max_minutes
    corpus = corpus if corpus is not None else load_corpus("shakespeare")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    model, info = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    batches = ByteBatcher(corpus["train"], cfg.block_size, cfg.batch_size, seed=cfg.seed,
                          device=cfg.device)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16)
           if cfg.autocast == "bfloat16" and device.type == "cuda" else nullcontext())
    meta = run_meta(cfg.device, config=asdict(cfg), **info)
    log = {"meta": meta, "train": [], "val": [], "sessions": [], "status": "running"}
    step = 0
    ckpt = Path(cfg.ckpt_dir) / f"{cfg.model}.pt" if cfg.ckpt_dir else None
    if cfg.resume and ckpt is not None and ckpt.exists():
        # Load on the CPU: the RNG and sampler states must stay CPU ByteTensors (mapped to
        # CUDA, set_rng_state rejects them); load_state_dict copies weights and optimizer
        # state onto the parameters' device.
        saved = load_torch(ckpt, "training checkpoint", map_location="cpu",
                           fix="delete it to train from step 0, or restore a good copy")
        diff = [k for k in RESUME_MUST_MATCH if saved["config"].get(k) != getattr(cfg, k)]
        if diff:
            raise SystemExit(f"--resume: {ckpt} was written with other settings: " + ", ".join(
                f"{k}={saved['config'].get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        batches.load_state_dict(saved["batches"])
        _set_rng_state(saved["rng"], device)
        log, step = saved["log"], saved["step"]
        log.setdefault("sessions", [])
        if log["status"] == "finished" and step >= cfg.steps:
            return log                                  # nothing left to do
        log["status"] = "running"
        print(f"resuming {cfg.model} from {ckpt} at step {step}")
    elif cfg.resume:
        print(f"--resume: no checkpoint at {ckpt}; starting {cfg.model} from step 0")
    # Each session (a first run, then every --resume) says where and from which step it ran.
    log["sessions"].append({"start_step": step, "date": meta["date"], "device": meta["device"],
                            "commit": meta["commit"]})
    fwd = torch.compile(model) if cfg.compile else model

    def save(status):
        log["status"] = status
        log["sessions"][-1]["end_step"] = step
        if device.type == "cuda":
            log["meta"]["peak_memory_bytes"] = max(log["meta"].get("peak_memory_bytes", 0),
                                                   torch.cuda.max_memory_allocated(device))
        if ckpt is not None:
            save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "batches": batches.state_dict(), "rng": _rng_state(device),
                        "step": step, "log": log, "config": asdict(cfg)}, ckpt)
        if cfg.out:
            write_json(Path(cfg.out) / "train_log.json", log)

    def call_hook(s):
        if hook is not None:
            model.eval()
            with torch.no_grad():
                hook(s, model, log)
            model.train()

    def do_eval(s):
        if log["val"] and log["val"][-1]["step"] == s:
            return                       # already done (a finished run extended with --steps)
        log["val"].append({"step": s, **evaluate(model, corpus["val"], cfg, ctx)})
        if cfg.out:                      # the log on disk grows as the run goes
            write_json(Path(cfg.out) / "train_log.json", log)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    train_time, tok_since = 0.0, 0          # tok/s counts training steps only, not evals/hooks
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step")
    while step < cfg.steps:
        if deadline is not None and time.time() > deadline:
            save("interrupted")
            bar.close()
            print(f"{cfg.model}: time limit reached at step {step}; checkpoint in {ckpt}; "
                  f"rerun the same command with --resume to continue")
            return log
        call_hook(step)
        if step % cfg.eval_every == 0:
            do_eval(step)
        t0 = time.time()
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            x, y = batches.next()
            with ctx:
                _, loss = fwd(x, y)
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum     # syncs: the time is real
        if not math.isfinite(loss_sum):
            save("diverged")
            raise RuntimeError(f"loss is {loss_sum} at step {step}; checkpoint kept")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.time() - t0
        step += 1
        tok_since += tokens_per_step
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = tok_since / max(train_time, 1e-9)
            entry = {"step": step, "loss": loss_sum, "tok_s": rate,
                     "tokens": step * tokens_per_step}
            if device.type == "cuda":
                entry["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            log["train"].append(entry)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{rate:,.0f}")
            train_time, tok_since = 0.0, 0
        bar.update(1)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            save("running")
    bar.close()
    call_hook(step)
    do_eval(step)
    save("finished")
    return log


def parse_overrides(text: str, allowed: list[str], flag: str = "--bdh") -> dict:
    """'n_layer=2,n_embd=64,dropout=0.0' → {"n_layer": 2, ...}; values are Python literals."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise SystemExit(f"{flag}: expected KEY=VALUE pairs with KEY among {allowed}, "
                             f"got {item!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()                    # a bare string, e.g. backend=torch
    return out


def bdh_fields() -> list[str]:
    from bdh import BDHConfig
    return [f.name for f in dataclasses.fields(BDHConfig) if f.name != "gradient_checkpointing"]


# Help text per TrainConfig field; the default each flag shows is the preset's (see _shown).
FLAG_HELP = {
    "device": "cpu, cuda or cuda:i",
    "steps": "optimizer steps in all (a resumed run continues up to this many)",
    "batch_size": "sequences per micro-batch",
    "block_size": "bytes per training sequence",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "eval_every": "steps between validation evaluations",
    "eval_batches": "validation batches per evaluation (the same ones every time)",
    "log_every": "steps between training-loss log entries",
    "seed": "seed of the model initialisation, batch sampler and dropout",
    "autocast": "'none' or 'bfloat16' (autocast on CUDA)",
    "compile": "torch.compile the training forward",
    "grad_checkpoint": "gradient checkpointing of the BDH layers (less memory, more compute)",
    "out": "folder of the JSON log (train_log.json)",
    "ckpt_dir": "folder of the checkpoint <model>.pt that --resume continues from",
    "ckpt_every": "also checkpoint every this many steps (0: only at the end and when "
                  "--max-minutes stops the run)",
    "resume": "continue from the checkpoint in --ckpt-dir (from step 0 if there is none)",
    "max_minutes": "stop cleanly, with a checkpoint, after this many minutes; rerun the same "
                   "command with --resume to continue",
}


def _shown(name: str) -> str:
    """The default of a TrainConfig field as --help shows it: per preset where they differ."""
    if name == "out":
        return "runs/train/<model>"
    if name == "ckpt_dir":
        return "<out>/ckpt"
    if name == "max_minutes":
        return "no limit"
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    per = {p: PRESETS[p].get(name, f.default) for p in sorted(PRESETS)}
    if len({repr(v) for v in per.values()}) == 1:
        return repr(next(iter(per.values()))).strip("'")
    return ", ".join(f"{v} with --preset {p}" for p, v in per.items())


def build_parser(description=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.train",
                                description=description or __doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["bdh", "gpt2", "bsbr"], default="bdh",
                   help="BDH, or a GPT-2 or BSBR LM matched to the preset's BDH by parameter count")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: a tiny model for about a minute on a laptop; h100: the official "
                        "BDH training setting")
    p.add_argument("--bdh", default=argparse.SUPPRESS, metavar="K=V,...",
                   help="BDHConfig fields over the preset's, e.g. n_layer=2,n_embd=64 "
                        "(for --model gpt2: the BDH whose parameter count the GPT-2 matches); "
                        "default: the preset's")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "preset", "bdh"):
            continue
        flag = "--" + f.name.replace("_", "-")
        # SUPPRESS: an absent flag leaves the preset's value; the help says what that is.
        text = f"{FLAG_HELP[f.name]} (default: {_shown(f.name)})".replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    return p


def config_from_args(argv=None, description=None) -> TrainConfig:
    """The TrainConfig of a command line: the preset, then the flags given. The log defaults to
    runs/train/<model> and the checkpoint to <out>/ckpt, so every run can be resumed."""
    # Flags not given stay None (their argparse default is SUPPRESS): the preset decides.
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("model", "preset")]
    a = build_parser(description).parse_args(
        argv, namespace=argparse.Namespace(**dict.fromkeys(names, None)))
    cfg = TrainConfig(model=a.model, preset=a.preset, **PRESETS[a.preset])
    cfg.bdh = dict(cfg.bdh)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(a, f.name, None)
        if v is not None and f.name not in ("model", "preset", "bdh"):
            setattr(cfg, f.name, v)
    if a.bdh:
        cfg.bdh.update(parse_overrides(a.bdh, bdh_fields()))
    if cfg.out is None:
        cfg.out = default_out(f"train/{cfg.model}")
    if cfg.ckpt_dir is None:
        cfg.ckpt_dir = str(Path(cfg.out) / "ckpt")
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Fail with a message naming the flag, the value and what was expected."""
    for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_every",
                 "eval_batches", "log_every"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "ckpt_every"):
        if getattr(cfg, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_minutes is not None and cfg.max_minutes < 0:
        raise SystemExit(f"--max-minutes must be >= 0, got {cfg.max_minutes}")
    if cfg.autocast not in ("none", "bfloat16"):
        raise SystemExit(f"--autocast must be 'none' or 'bfloat16', got {cfg.autocast!r}")
    if cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:i], got {cfg.device!r}")
    if (cfg.resume or cfg.max_minutes is not None) and not cfg.ckpt_dir:
        raise SystemExit("--resume and --max-minutes need --ckpt-dir (where the checkpoint "
                         "that carries the run across sessions is kept)")
    try:
        from bdh import BDHConfig
        BDHConfig(**cfg.bdh)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--bdh: {e}") from None


def main(argv=None, corpus=None) -> dict:
    cfg = config_from_args(argv)
    log = train(cfg, corpus)
    meta = log["meta"]
    last = log["train"][-1] if log["train"] else {}
    val = log["val"][-1] if log["val"] else {}
    size = f"{meta['params']:,} params"
    if "matched_to_bdh_params" in meta:
        size += f" (matched to BDH's {meta['matched_to_bdh_params']:,})"
    print(f"{cfg.model}: {size}, status {log['status']} at step {last.get('step', 0)}, "
          f"train loss {last.get('loss', float('nan')):.4f}, "
          f"val loss {val.get('loss', float('nan')):.4f}, {last.get('tok_s', 0):,.0f} tok/s"
          + (f", peak {meta['peak_memory_bytes'] / 2**30:.1f} GiB"
             if "peak_memory_bytes" in meta else ""))
    if val.get("densities"):
        print("  densities (xs/ys/xy) per layer: " + "; ".join(
            f"L{i} {d['xs']:.3f}/{d['ys']:.3f}/{d['xy']:.3f}"
            for i, d in enumerate(val["densities"])))
    print(f"  log: {cfg.out}/train_log.json; checkpoint: {cfg.ckpt_dir}/{cfg.model}.pt "
          f"(continue with --resume)")
    return log


if __name__ == "__main__":
    main()

"""Long-range memory tasks (issue #13): which token mixer remembers what, at which state size?

    python -m experiments.long_range                                  # CPU: about two minutes
    python -m experiments.long_range --mixers softmax,deltanet --steps 200
    python -m experiments.long_range --preset h100                    # MQAR, vocab 8192, T=256
    python -m experiments.long_range --preset h100 --curriculum full --vocab 512 \
        --eval-tasks copy,mqar,needle,infill,multihop --eval-lengths 512,1024,2048,4096
    python -m experiments.long_range --max-minutes 30 --resume        # split over sessions
    python -m experiments.long_range --preset h100 --jobs 6 --max-minutes 9   # all at once

One small `baselines.MixerLM` per mixer (same d_model, layers and heads: only the mixer
differs) trains on the synthetic tasks of `experiments.tasks` (copy, Zoology MQAR, needle in a
haystack, long infill, multi-hop recall) under an accuracy-driven curriculum (longer contexts,
more tasks, harder levels; `experiments.tasks.curriculum`). The loss is the cross-entropy at the
answer positions only. Each mixer is then scored (exact match per answer, and per sequence) on
fresh batches of every task at every --eval-lengths, including lengths longer than any it
trained on, with each task's difficulty scaled to the length (MQAR: T/4 pairs). The state size
is ``state.nbytes()`` of the model's streaming state after one eval sequence of that length.

Checkpoints are atomic, per mixer, under OUT/<mixer>/ckpt/state.pt (model, optimizer,
curriculum, step, log): --max-minutes stops cleanly (a stopped mixer is still scored, with status
"interrupted") and a rerun with --resume continues each mixer from its step (a finished mixer is
not retrained). Writes OUT/long_range.json,
OUT/long_range.md and OUT/long_range.png (accuracy vs length per mixer; accuracy vs state bytes).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from baselines.lm import MIXERS, MixerLM, MixerLMConfig

from . import tasks as T
from .results import (default_out, load_torch, markdown_table, run_meta, save_figure, save_torch,
                      write_json, write_text)

EVAL_SEED = 20_000          # eval batches: the same in every run and for every mixer


@dataclass
class LongRangeConfig:
    preset: str = "cpu"
    device: str = "cpu"
    mixers: tuple = MIXERS
    curriculum: str = "cpu"
    eval_tasks: tuple = tuple(T.TASKS)
    eval_lengths: tuple = (32, 64, 128, 256)
    vocab: int = 64
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 2
    window: int = 16                  # sliding-window mixer
    short_conv: int = 4               # causal short convolution before every mixer (0: none)
    chunk: int = 16                   # BSBR chunk size
    hebbian_neurons: int = 0          # N per head of the bdh mixer (0: BDHAttention's default)
    hebbian_heads: int = 0            # heads of the bdh mixer (0: n_head)
    hebbian_rope: int = 1             # 1: RoPE on the bdh mixer's neurons (BDH); 0: off
    steps: int = 200
    batch_size: int = 16
    eval_batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    threshold: float = 0.9
    window_reports: int = 3
    log_every: int = 10
    ckpt_every: int = 0
    seed: int = 0
    max_minutes: float | None = None
    jobs: int = 1
    resume: bool = False
    out: str = field(default_factory=lambda: default_out("long_range"))


PRESETS = {
    "cpu": {},
    # The setting (Zoology MQAR): vocab 8192, train T=256 with 16 → 32 → 64 pairs,
    # test (512, 128) and (1024, 256); d_model 128, 2 layers. Batch 256: a 7-minute H200 run at
    # batch 64 left most mixers at 16 pairs (2026-12-04), and on the CPU batch 128 learned MQAR
    # ~2× faster per step than batch 32 (softmax, 500 steps: 0.157 against 0.084 accuracy).
    "h100": dict(device="cuda", curriculum="mqar", eval_tasks=("mqar",),
                 eval_lengths=(256, 512, 1024), vocab=8192, d_model=128, n_layer=2, n_head=2,
                 window=64, chunk=64, steps=8000, batch_size=256, eval_batch=64, lr=1e-3,
                 weight_decay=0.1, window_reports=20, log_every=100, ckpt_every=500),
}

FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LongRangeConfig)
                  if f.default is not dataclasses.MISSING}

# A checkpoint resumes only a run with the same model, data and optimizer settings.
RESUME_MUST_MATCH = ("curriculum", "vocab", "d_model", "n_layer", "n_head", "window",
                     "short_conv", "chunk", "hebbian_neurons", "hebbian_heads", "hebbian_rope",
                     "batch_size", "lr", "weight_decay", "threshold", "window_reports", "seed")

HELP = {
    "device": "cpu, cuda or cuda:i",
    "mixers": f"comma list of token mixers among {MIXERS}",
    "curriculum": f"phases of length / task mix, one of {tuple(T.CURRICULA)}",
    "eval_tasks": f"comma list of tasks to score, among {tuple(T.TASKS)}",
    "eval_lengths": "comma list of context lengths to score at (include some longer than the "
                    "curriculum trains on)",
    "vocab": "vocabulary size of every task and model",
    "d_model": "model width (the same for every mixer)",
    "n_layer": "blocks per model",
    "n_head": "heads per mixer",
    "window": "window of the sliding-window mixer (tokens)",
    "chunk": "chunk size of the BSBR mixer (tokens)",
    "hebbian_neurons": "neurons per head of the bdh mixer (0: BDHAttention's 16·d_model/"
                       "heads); its state is n_layer·heads·N·d_model floats against linear "
                       "attention's n_layer·n_head·(d_model/n_head)², so N = d_model/(n_head·"
                       "heads) gives equal states (issue #13's comparison)",
    "hebbian_heads": "heads of the bdh mixer (0: --n-head). Its values are the whole "
                     "d_model-wide input, so at equal state its key width N is d_model/n_head "
                     "(linear attention's head width) with 1 head, d_model/n_head² with n_head",
    "hebbian_rope": "1: the bdh mixer rotates its neurons by position (RoPE, as BDH); 0: "
                    "no RoPE, q = k = relu(x @ encoder) (an ablation: does position "
                    "rotation cost content recall?)",
    "short_conv": "width of the causal depthwise convolution in front of every mixer (0: none; "
                  "without it no mixer sees positions, and MQAR stalls at ~20%)",
    "steps": "optimizer steps per mixer (a resumed run continues up to this many)",
    "batch_size": "training sequences per step",
    "eval_batch": "sequences per (task, length) evaluation",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "threshold": "curriculum: step up when the mean batch accuracy reaches this",
    "window_reports": "curriculum: over this many batches of a task",
    "log_every": "steps between training-log entries",
    "ckpt_every": "also checkpoint every this many steps (0: at the end and when stopped)",
    "seed": "seed of the model initialisation, the task batches and the curriculum draws",
    "max_minutes": "stop cleanly (checkpoints kept) after this many minutes over all mixers; "
                   "rerun with --resume to continue",
    "jobs": "train this many mixers at once, one spawned process each, sharing the device "
            "(small models leave a GPU mostly idle; --max-minutes then applies to each)",
    "resume": "continue every mixer from OUT/<mixer>/ckpt/state.pt (from step 0 if absent)",
    "out": "output folder",
}


def _shown(name: str) -> str:
    if name == "max_minutes":
        return "no limit"
    f = {f.name: f for f in dataclasses.fields(LongRangeConfig)}[name]
    base = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    per = {p: PRESETS[p].get(name, base) for p in sorted(PRESETS)}

    def show(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    if len({repr(v) for v in per.values()}) == 1:
        return show(base)
    return "; ".join(f"{show(v)} with --preset {p}" for p, v in per.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.long_range",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: tiny models and lengths for a laptop; h100: the issue's MQAR "
                        "setting (vocab 8192, T=256 with 64 pairs, test at 512 and 1024)")
    for f in dataclasses.fields(LongRangeConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP[f.name]} (default: {_shown(f.name)})".replace("%", "%%")
        if f.name == "resume":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    return p


def _names(text: str, allowed, flag: str, p) -> tuple:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        p.error(f"{flag}: expected a comma list of {tuple(allowed)}, got {text!r}")
    return items


def config_from_args(argv=None) -> LongRangeConfig:
    p = build_parser()
    a = vars(p.parse_args(argv))
    cfg = LongRangeConfig(preset=a.pop("preset"))
    cfg = dataclasses.replace(cfg, **PRESETS[cfg.preset])
    for key in ("mixers", "eval_tasks"):
        if key in a:
            allowed = MIXERS if key == "mixers" else tuple(T.TASKS)
            a[key] = _names(a[key], allowed, "--" + key.replace("_", "-"), p)
    if "eval_lengths" in a:
        try:
            a["eval_lengths"] = tuple(int(s) for s in a["eval_lengths"].split(",") if s.strip())
        except ValueError:
            p.error(f"--eval-lengths: expected a comma list of ints, got {a['eval_lengths']!r}")
    cfg = dataclasses.replace(cfg, **a)
    try:
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def check_config(cfg: LongRangeConfig) -> None:
    """Raise ValueError naming the flag, the value and what was expected."""
    for name in ("vocab", "d_model", "n_layer", "n_head", "window", "chunk", "steps",
                 "batch_size", "eval_batch", "log_every", "window_reports", "jobs"):
        v = getattr(cfg, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {v}")
    for name in ("lr", "weight_decay", "ckpt_every", "short_conv", "hebbian_neurons",
                 "hebbian_heads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(cfg, name)}")
    if cfg.hebbian_rope not in (0, 1):
        raise ValueError(f"--hebbian-rope: expected 0 or 1, got {cfg.hebbian_rope}")
    if not 0 < cfg.threshold <= 1:
        raise ValueError(f"--threshold: expected a float in (0, 1], got {cfg.threshold}")
    if cfg.max_minutes is not None and cfg.max_minutes < 0:
        raise ValueError(f"--max-minutes: expected >= 0, got {cfg.max_minutes}")
    if cfg.curriculum not in T.CURRICULA:
        raise ValueError(f"--curriculum: expected one of {tuple(T.CURRICULA)}, "
                         f"got {cfg.curriculum!r}")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"--d-model: expected a multiple of --n-head {cfg.n_head}, "
                         f"got {cfg.d_model}")
    if cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda[:i], got {cfg.device!r}")
    if not cfg.eval_lengths or min(cfg.eval_lengths) < 4:
        raise ValueError(f"--eval-lengths: expected lengths >= 4, got {cfg.eval_lengths}")
    for ph in T.CURRICULA[cfg.curriculum]:
        for task in ph.tasks:
            if T.get_task(task).max_difficulty(ph.length, cfg.vocab) < 1:
                raise ValueError(f"--vocab: {cfg.vocab} is too small for {task} at length "
                                 f"{ph.length} (curriculum {cfg.curriculum})")
    for L in cfg.eval_lengths:
        for task in cfg.eval_tasks:
            if T.get_task(task).max_difficulty(L, cfg.vocab) < 1:
                raise ValueError(f"--eval-lengths: {task} does not fit length {L} with vocab "
                                 f"{cfg.vocab}")


def build_model(cfg: LongRangeConfig, mixer: str) -> MixerLM:
    hebbian = {"n_neurons": cfg.hebbian_neurons} if cfg.hebbian_neurons else {}
    if cfg.hebbian_heads:
        hebbian["n_head"] = cfg.hebbian_heads
    if not cfg.hebbian_rope:
        hebbian["rope"] = False
    kw = {"sliding": {"window": cfg.window}, "bsbr": {"chunk_size": cfg.chunk},
          "bdh": hebbian}.get(mixer, {})
    torch.manual_seed(cfg.seed)        # the same embedding / MLP initialisation for every mixer
    mcfg = MixerLMConfig(mixer=mixer, vocab_size=cfg.vocab, n_layer=cfg.n_layer,
                         d_model=cfg.d_model, n_head=cfg.n_head, short_conv=cfg.short_conv,
                         mixer_kwargs=kw)
    return MixerLM(mcfg).to(cfg.device)


def batch_seed(cfg: LongRangeConfig, step: int) -> int:
    return cfg.seed * 1_000_003 + step          # the stream of batches is a function of the step


@torch.no_grad()
def evaluate(model, cfg: LongRangeConfig) -> tuple[list, dict]:
    """Accuracy per (task, length) on fixed batches, and the state bytes per length (keys: str(T),
    as in the JSON)."""
    model.eval()
    rows, state_bytes = [], {}
    for L in cfg.eval_lengths:
        for i, task in enumerate(cfg.eval_tasks):
            mod = T.get_task(task)
            d = mod.default_difficulty(L, cfg.vocab)
            x, y, m = mod.make(cfg.eval_batch, L, d, cfg.vocab, seed=EVAL_SEED + 97 * L + i)
            x, y, m = x.to(cfg.device), y.to(cfg.device), m.to(cfg.device)
            logits, _ = model(x)
            rows.append({"task": task, "length": L, "difficulty": d,
                         **T.accuracy(logits, y, m)})
        try:                      # the memory one sequence of length L leaves in the state
            _, st = model(x[:1], return_state=True)
            state_bytes[str(L)] = int(st.nbytes())
        except (NotImplementedError, AttributeError, RuntimeError) as e:
            state_bytes[str(L)] = None
            print(f"state bytes at length {L}: unavailable ({type(e).__name__}: {e})")
    model.train()
    return rows, state_bytes


def run_mixer(cfg: LongRangeConfig, mixer: str, deadline: float | None) -> dict:
    """Train (or resume) one mixer, then evaluate it; returns its result entry."""
    if str(cfg.device).startswith("cuda"):
        # TF32 for the float32 torch matmuls (embedding, MLPs, head; PyTorch's default is full
        # float32 on the SIMT units). The mixers' Triton kernels pick their own precision.
        torch.backends.cuda.matmul.allow_tf32 = True
    ckpt = Path(cfg.out) / mixer / "ckpt" / "state.pt"
    # The bdh mixer was called "hebbian": its older checkpoints resume (and save under bdh/).
    old_ckpt = Path(cfg.out) / "hebbian" / "ckpt" / "state.pt"
    resume_from = old_ckpt if mixer == "bdh" and not ckpt.exists() and old_ckpt.exists() else ckpt
    model = build_model(cfg, mixer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cur = T.Curriculum(T.CURRICULA[cfg.curriculum], cfg.vocab, cfg.threshold, cfg.window_reports)
    log = {"mixer": mixer, "params": model.num_params(), "status": "running", "train": [],
           "events": [], "sessions": []}
    step = 0
    if cfg.resume and resume_from.exists():
        saved = load_torch(resume_from, "long_range checkpoint", map_location="cpu",
                           fix="delete it to train this mixer from step 0")
        # A setting the checkpoint predates had its default then.
        was = {k: saved["config"].get(k, FIELD_DEFAULTS.get(k)) for k in RESUME_MUST_MATCH}
        diff = [k for k in RESUME_MUST_MATCH if was[k] != getattr(cfg, k)]
        if diff:
            raise SystemExit(f"--resume: {resume_from} was written with other settings: "
                             + ", ".join(f"--{k.replace('_', '-')} {was[k]!r} "
                                         f"(now {getattr(cfg, k)!r})" for k in diff))
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        cur.load_state_dict(saved["curriculum"])
        log, step = saved["log"], saved["step"]
        log["mixer"] = mixer
        if log["status"] == "finished" and step >= cfg.steps and "eval" in log:
            return log                                  # nothing left to do
        log.pop("eval", None)                           # scores of an earlier step: stale
        log.pop("state_bytes", None)
    log["sessions"].append({"start_step": step, "date": run_meta(cfg.device)["date"]})

    def save(status):
        log["status"] = status
        log["sessions"][-1]["end_step"] = step
        log["curriculum"] = cur.position()
        save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "curriculum": cur.state_dict(), "step": step, "log": log,
                    "config": asdict(cfg)}, ckpt)

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"long_range {mixer}", unit="step")
    acc_sum, loss_sum, n = 0.0, 0.0, 0
    while step < cfg.steps:
        if deadline is not None and time.time() > deadline:
            # Score what it has learned so far (a resumed run drops these scores and trains on).
            log["eval"], log["state_bytes"] = evaluate(model, cfg)
            save("interrupted")
            bar.close()
            print(f"{mixer}: time limit reached at step {step}; scored as it is; rerun with "
                  f"--resume to continue")
            return log
        task, L, d = cur.sample(np.random.default_rng([cfg.seed, step]))
        x, y, m = T.make(task, cfg.batch_size, L, d, cfg.vocab, seed=batch_seed(cfg, step))
        x, y, m = x.to(cfg.device), y.to(cfg.device), m.to(cfg.device)
        # The head runs on the answer rows only (about 1/4 of the positions in MQAR): with vocab
        # 8192 the full [B, T, V] logits were most of a training step's GPU work.
        ans = model.head(model.features(x)[m])
        loss = F.cross_entropy(ans.float(), y[m])
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            save("diverged")
            raise RuntimeError(f"{mixer}: loss is {loss_value} at step {step}; checkpoint kept")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = float((ans.detach().argmax(-1) == y[m]).float().mean())
        event = cur.update(task, acc)
        step += 1
        if event != "hold":
            log["events"].append({"step": step, "event": event, **cur.position()})
        acc_sum, loss_sum, n = acc_sum + acc, loss_sum + loss_value, n + 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            log["train"].append({"step": step, "loss": loss_sum / n, "acc": acc_sum / n,
                                 "phase": cur.phase, "length": L})
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{acc_sum / n:.2f}", T=L)
            acc_sum, loss_sum, n = 0.0, 0.0, 0
        bar.update(1)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            save("running")
    bar.close()
    log["eval"], log["state_bytes"] = evaluate(model, cfg)
    save("finished")
    return log


def summary_rows(result: dict) -> list[dict]:
    """One row per (mixer, task): accuracy at every eval length."""
    rows = []
    for mixer, r in result["mixers"].items():
        by = {}
        for e in r.get("eval", []):
            by.setdefault(e["task"], {})[e["length"]] = e["acc"]
        for task, accs in by.items():
            rows.append({"mixer": mixer, "task": task,
                         **{f"T={L}": accs.get(L) for L in result["config"]["eval_lengths"]}})
    return rows


def mean_acc(r: dict, L: int):
    accs = [e["acc"] for e in r.get("eval", []) if e["length"] == L]
    return sum(accs) / len(accs) if accs else None


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = result["config"]["eval_lengths"]
    # the longest context any mixer actually trained at (the curriculum may not have got there)
    train_max = max((e["length"] for r in result["mixers"].values() for e in r["train"]),
                    default=None)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mixer, r in result["mixers"].items():
        if "eval" not in r:
            continue
        accs = [mean_acc(r, L) for L in lengths]
        a1.plot(lengths, accs, "-o", ms=4, label=mixer)
        sb = r.get("state_bytes", {})
        pts = [(sb.get(str(L)), a) for L, a in zip(lengths, accs) if sb.get(str(L))]
        if pts:
            a2.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=mixer)
    if train_max:
        a1.axvline(train_max, color="grey", ls=":", lw=1, label=f"longest trained (T={train_max})")
    a1.set(xscale="log", xlabel="context length T", ylabel="accuracy (mean over tasks)",
           ylim=(-0.02, 1.02), title="accuracy vs length")
    a2.set(xscale="log", xlabel="state bytes after one sequence (per layer stack)",
           ylabel="accuracy (mean over tasks)", ylim=(-0.02, 1.02),
           title="accuracy vs state size (one point per length)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"long-range memory tasks — {meta['device']}, commit {meta['commit']}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _where(pos: dict | None) -> str:
    if not pos:
        return "–"
    return (f"phase {pos['phase']} T={pos['length']}" + (" (done)" if pos["done"] else "") + ": "
            + " ".join(f"{t}:{d}" for t, d in pos["difficulty"].items()))


def write_outputs(result: dict, out: Path) -> None:
    write_json(out / "long_range.json", result)
    lengths = result["config"]["eval_lengths"]
    sizes = [{"mixer": m, "params": r["params"], "status": r["status"],
              "steps": r["sessions"][-1].get("end_step") if r["sessions"] else 0,
              "curriculum at end": _where(r.get("curriculum")),
              **{f"bytes T={L}": (r.get("state_bytes") or {}).get(str(L)) for L in lengths}}
             for m, r in result["mixers"].items()]
    text = "\n\n".join([
        "# Long-range memory tasks",
        f"{result['meta']['date']} · {result['meta']['device']} · commit "
        f"{result['meta']['commit']} · preset {result['config']['preset']}",
        "Exact-match accuracy per answer position (each task's difficulty scaled to T):",
        markdown_table(summary_rows(result)),
        "Streaming state size after one sequence (bytes) and training status:",
        markdown_table(sizes)])
    write_text(out / "long_range.md", text + "\n")
    if any("eval" in r for r in result["mixers"].values()):
        plot(result, out / "long_range.png")


def main(argv=None) -> dict:
    cfg = config_from_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
    out = Path(cfg.out)
    result = {"meta": run_meta(cfg.device), "config": asdict(cfg),
              "curriculum": [asdict(p) for p in T.CURRICULA[cfg.curriculum]], "mixers": {}}
    if cfg.jobs > 1 and len(cfg.mixers) > 1:
        # "spawn": a forked child cannot use CUDA. Each child trains, checkpoints and scores
        # one mixer and returns its log.
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(cfg.jobs, len(cfg.mixers))) as pool:
            logs = pool.starmap(run_mixer, [(cfg, m, deadline) for m in cfg.mixers])
        result["mixers"] = dict(zip(cfg.mixers, logs))
        write_outputs(result, out)
    for mixer in cfg.mixers:
        if mixer in result["mixers"]:
            continue
        result["mixers"][mixer] = run_mixer(cfg, mixer, deadline)
        write_outputs(result, out)                      # the results grow as the run goes
    rows = summary_rows(result)
    print(markdown_table(rows) if rows else "(no mixer finished)")
    print(f"results: {out}/long_range.json, .md, .png")
    return result


if __name__ == "__main__":
    main()

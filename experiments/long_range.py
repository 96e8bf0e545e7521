"""Long-range memory tasks: which token mixer remembers what, at which state size?

    python -m experiments.long_range                                  # CPU: about 40 s
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
from .harness import (Choice, Device, Flag, Float, Int, Ints, Names, Optional, OutDir,
                      build_parser as config_parser, default_out, load_torch, markdown_table,
                      option, parse_config, run_meta, save_figure, save_torch, threads_field,
                      torch_threads, write_json, write_text)

EVAL_SEED = 20_000          # eval batches: the same in every run and for every mixer


@dataclass
class LongRangeConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu, cuda or cuda:i"))
    threads: int | None = threads_field()
    mixers: tuple = field(default=MIXERS, metadata=option(
        Names(MIXERS), "comma list of token mixers"))
    curriculum: str = field(default="cpu", metadata=option(
        Choice(tuple(T.CURRICULA)), "phases of length / task mix"))
    eval_tasks: tuple = field(default=tuple(T.TASKS), metadata=option(
        Names(tuple(T.TASKS)), "comma list of tasks to score"))
    eval_lengths: tuple = field(default=(32, 64, 128, 256), metadata=option(
        Ints(4), "comma list of context lengths to score at (include some longer than the "
                 "curriculum trains on)"))
    vocab: int = field(default=64, metadata=option(
        Int(1), "vocabulary size of every task and model"))
    d_model: int = field(default=32, metadata=option(
        Int(1), "model width (the same for every mixer)"))
    n_layer: int = field(default=2, metadata=option(Int(1), "blocks per model"))
    n_head: int = field(default=2, metadata=option(Int(1), "heads per mixer"))
    window: int = field(default=16, metadata=option(
        Int(1), "window of the sliding-window mixer (tokens)"))
    short_conv: int = field(default=4, metadata=option(
        Int(0), "width of the causal depthwise convolution in front of every mixer (0: none; "
                "without it no mixer sees positions, and MQAR stalls at ~20%)"))
    chunk: int = field(default=16, metadata=option(
        Int(1), "chunk size of the BSBR mixer (tokens)"))
    hebbian_neurons: int = field(default=0, metadata=option(
        Int(0), "neurons per head of the bdh mixer (0: BDHAttention's 16·d_model/heads); its "
                "state is n_layer·heads·N·d_model floats against linear attention's "
                "n_layer·n_head·(d_model/n_head)², so N = d_model/(n_head·heads) gives equal "
                "states"))
    hebbian_heads: int = field(default=0, metadata=option(
        Int(0), "heads of the bdh mixer (0: --n-head). Its values are the whole d_model-wide "
                "input, so at equal state its key width N is d_model/n_head (linear "
                "attention's head width) with 1 head, d_model/n_head² with n_head"))
    hebbian_rope: int = field(default=1, metadata=option(
        Int(0, 1), "1: the bdh mixer rotates its neurons by position (RoPE, as BDH); 0: no "
                   "RoPE, q = k = relu(x @ encoder) (an ablation: does position rotation cost "
                   "content recall?)"))
    hebbian_untie: str = field(default="none", metadata=option(
        Choice(("none", "q", "v", "qv")), "the bdh mixer's untied ablations (not BDH): q, its "
                                          "own query encoder (q ≠ k); v, a value projection "
                                          "(v = x W_v, not x); qv, both"))
    steps: int = field(default=200, metadata=option(
        Int(1), "optimizer steps per mixer (a resumed run continues up to this many)"))
    batch_size: int = field(default=16, metadata=option(Int(1), "training sequences per step"))
    eval_batch: int = field(default=16, metadata=option(
        Int(1), "sequences per (task, length) evaluation"))
    lr: float = field(default=3e-3, metadata=option(Float(0), "AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=option(Float(0), "AdamW weight decay"))
    threshold: float = field(default=0.9, metadata=option(
        Float(0, 1, lo_open=True), "curriculum: step up when the mean batch accuracy reaches "
                                   "this"))
    window_reports: int = field(default=3, metadata=option(
        Int(1), "curriculum: over this many batches of a task"))
    log_every: int = field(default=10, metadata=option(
        Int(1), "steps between training-log entries"))
    ckpt_every: int = field(default=0, metadata=option(
        Int(0), "also checkpoint every this many steps (0: at the end and when stopped)"))
    seed: int = field(default=0, metadata=option(
        Int(0), "seed of the model initialisation, the task batches and the curriculum draws"))
    max_minutes: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "stop cleanly (checkpoints kept) after this many minutes over all "
                            "mixers; rerun with --resume to continue", shown="no limit"))
    jobs: int = field(default=1, metadata=option(
        Int(1), "train this many mixers at once, one spawned process each, sharing the device "
                "(small models leave a GPU mostly idle; --max-minutes then applies to each)"))
    resume: bool = field(default=False, metadata=option(
        Flag(), "continue every mixer from OUT/<mixer>/ckpt/state.pt (from step 0 if absent)"))
    out: str = field(default=default_out("long_range"), metadata=option(
        OutDir(), "output folder"))

    def check(self) -> None:
        """The rules between flags: the width splits into heads, and every task fits the
        vocabulary at every length it is trained or scored at."""
        if self.d_model % self.n_head:
            raise ValueError(f"--d-model: expected a multiple of --n-head {self.n_head}, "
                             f"got {self.d_model}")
        for ph in T.CURRICULA[self.curriculum]:
            for task in ph.tasks:
                if T.get_task(task).max_difficulty(ph.length, self.vocab) < 1:
                    raise ValueError(f"--vocab: {self.vocab} is too small for {task} at length "
                                     f"{ph.length} (curriculum {self.curriculum})")
        for L in self.eval_lengths:
            for task in self.eval_tasks:
                if T.get_task(task).max_difficulty(L, self.vocab) < 1:
                    raise ValueError(f"--eval-lengths: {task} does not fit length {L} with "
                                     f"vocab {self.vocab}")


PRESETS = {
    "cpu": dict(threads=1),
    # The Zoology MQAR setting: vocab 8192, train T=256 with 16 → 32 → 64 pairs, test (512, 128)
    # and (1024, 256); d_model 128, 2 layers. Batch 256: a 7-minute H200 run at batch 64 left
    # most mixers at 16 pairs, and on the CPU batch 128 learned MQAR ~2× faster per step than
    # batch 32 (softmax, 500 steps: 0.157 against 0.084 accuracy).
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
                     "hebbian_untie",
                     "batch_size", "lr", "weight_decay", "threshold", "window_reports", "seed")


def build_parser():
    return config_parser(LongRangeConfig, PRESETS, prog="python -m experiments.long_range",
                         description=__doc__.split("\n\n")[0])


def config_from_args(argv=None) -> LongRangeConfig:
    return parse_config(LongRangeConfig, PRESETS, argv, prog="python -m experiments.long_range",
                        description=__doc__.split("\n\n")[0])


def build_model(cfg: LongRangeConfig, mixer: str) -> MixerLM:
    hebbian = {"n_neurons": cfg.hebbian_neurons} if cfg.hebbian_neurons else {}
    if cfg.hebbian_heads:
        hebbian["n_head"] = cfg.hebbian_heads
    if not cfg.hebbian_rope:
        hebbian["rope"] = False
    if "q" in cfg.hebbian_untie:
        hebbian["query_encoder"] = True
    if "v" in cfg.hebbian_untie:
        hebbian["value_proj"] = True
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


def read_mixer_checkpoint(cfg: LongRangeConfig, mixer: str) -> dict | None:
    """The checkpoint --resume continues ``mixer`` from (None without --resume or a file);
    refused when it was written with other settings. The bdh mixer was called "hebbian": its
    older checkpoints resume (and save under bdh/ from then on)."""
    path = checkpoint_path(cfg, mixer)
    old = Path(cfg.out) / "hebbian" / "ckpt" / "state.pt"
    if mixer == "bdh" and not path.exists() and old.exists():
        path = old
    if not cfg.resume or not path.exists():
        return None
    saved = load_torch(path, "long_range checkpoint", map_location="cpu",
                       fix="delete it to train this mixer from step 0")
    # A setting the checkpoint predates had its default then.
    was = {k: saved["config"].get(k, FIELD_DEFAULTS.get(k)) for k in RESUME_MUST_MATCH}
    diff = [k for k in RESUME_MUST_MATCH if was[k] != getattr(cfg, k)]
    if diff:
        raise SystemExit(f"--resume: {path} was written with other settings: "
                         + ", ".join(f"--{k.replace('_', '-')} {was[k]!r} "
                                     f"(now {getattr(cfg, k)!r})" for k in diff))
    return saved


def checkpoint_path(cfg: LongRangeConfig, mixer: str) -> Path:
    return Path(cfg.out) / mixer / "ckpt" / "state.pt"


class MixerRun:
    """One mixer's training session: model, optimizer, curriculum, step and log."""

    def __init__(self, cfg: LongRangeConfig, mixer: str, saved: dict | None):
        self.cfg, self.mixer = cfg, mixer
        self.model = build_model(cfg, mixer)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.cur = T.Curriculum(T.CURRICULA[cfg.curriculum], cfg.vocab, cfg.threshold,
                                cfg.window_reports)
        self.log = {"mixer": mixer, "params": self.model.num_params(), "status": "running",
                    "train": [], "events": [], "sessions": []}
        self.step = 0
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.opt.load_state_dict(saved["optimizer"])
            self.cur.load_state_dict(saved["curriculum"])
            self.log, self.step = saved["log"], saved["step"]
            self.log["mixer"] = mixer

    def save(self, status: str) -> None:
        log = self.log
        log["status"] = status
        log["sessions"][-1]["end_step"] = self.step
        log["curriculum"] = self.cur.position()
        save_torch({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "curriculum": self.cur.state_dict(), "step": self.step, "log": log,
                    "config": asdict(self.cfg)}, checkpoint_path(self.cfg, self.mixer))

    def score(self, status: str) -> dict:
        self.log["eval"], self.log["state_bytes"] = evaluate(self.model, self.cfg)
        self.save(status)
        return self.log

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step on a curriculum batch: (loss, accuracy, length)."""
        cfg, step = self.cfg, self.step
        task, L, d = self.cur.sample(np.random.default_rng([cfg.seed, step]))
        x, y, m = T.make(task, cfg.batch_size, L, d, cfg.vocab, seed=batch_seed(cfg, step))
        x, y, m = x.to(cfg.device), y.to(cfg.device), m.to(cfg.device)
        # The head runs on the answer rows only (about 1/4 of the positions in MQAR): with vocab
        # 8192 the full [B, T, V] logits were most of a training step's GPU work.
        ans = self.model.head(self.model.features(x)[m])
        loss = F.cross_entropy(ans.float(), y[m])
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            self.save("diverged")
            raise RuntimeError(f"{self.mixer}: loss is {loss_value} at step {step}; "
                               f"checkpoint kept")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        acc = float((ans.detach().argmax(-1) == y[m]).float().mean())
        event = self.cur.update(task, acc)
        self.step += 1
        if event != "hold":
            self.log["events"].append({"step": self.step, "event": event, **self.cur.position()})
        return loss_value, acc, L


def run_mixer(cfg: LongRangeConfig, mixer: str, deadline: float | None) -> dict:
    """Train (or resume) one mixer, then evaluate it; returns its result entry."""
    if str(cfg.device).startswith("cuda"):
        # TF32 for the float32 torch matmuls (embedding, MLPs, head; PyTorch's default is full
        # float32 on the SIMT units). The mixers' Triton kernels pick their own precision.
        torch.backends.cuda.matmul.allow_tf32 = True
    saved = read_mixer_checkpoint(cfg, mixer)
    if saved is not None and saved["log"]["status"] == "finished" \
            and saved["step"] >= cfg.steps and "eval" in saved["log"]:
        return {**saved["log"], "mixer": mixer}              # nothing left to do
    with torch_threads(cfg.threads):
        run = MixerRun(cfg, mixer, saved)
        run.log.pop("eval", None)                          # scores of an earlier step: stale
        run.log.pop("state_bytes", None)
        run.log["sessions"].append({"start_step": run.step,
                                    "date": run_meta(cfg.device)["date"]})
        return train_mixer(run, deadline)


def train_mixer(run: MixerRun, deadline: float | None) -> dict:
    cfg = run.cfg
    run.model.train()
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"long_range {run.mixer}", unit="step")
    acc_sum, loss_sum, n = 0.0, 0.0, 0
    while run.step < cfg.steps:
        if deadline is not None and time.time() > deadline:
            # Score what it has learned so far (a resumed run drops these scores and trains on).
            bar.close()
            print(f"{run.mixer}: time limit reached at step {run.step}; scored as it is; "
                  f"rerun with --resume to continue")
            return run.score("interrupted")
        loss, acc, L = run.train_step()
        acc_sum, loss_sum, n = acc_sum + acc, loss_sum + loss, n + 1
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            run.log["train"].append({"step": run.step, "loss": loss_sum / n,
                                     "acc": acc_sum / n, "phase": run.cur.phase, "length": L})
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{acc_sum / n:.2f}", T=L)
            acc_sum, loss_sum, n = 0.0, 0.0, 0
        bar.update(1)
        if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
            run.save("running")
    bar.close()
    return run.score("finished")


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
            a2.plot([p[0] / 1024 for p in pts], [p[1] for p in pts], "-o", ms=4, label=mixer)
    if train_max:
        a1.axvline(train_max, color="grey", ls=":", lw=1, label=f"longest trained (T={train_max})")
    a1.set_xscale("log", base=2)
    a1.set(xlabel="context length T", ylabel="accuracy (mean over tasks)",
           ylim=(-0.02, 1.02), title="accuracy vs length")
    a2.set_xscale("log", base=2)
    a2.set(xlabel="state after one sequence (KiB, the whole layer stack)",
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
    for mixer in cfg.mixers:                  # refuse a mismatched checkpoint before any work
        read_mixer_checkpoint(cfg, mixer)
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

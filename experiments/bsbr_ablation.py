"""BSBR ablations on MQAR: chunk size, and how far the state bank can be compressed.

    python -m experiments.bsbr_ablation                     # CPU: about a minute (tiny)
    python -m experiments.bsbr_ablation --vocab 256 --d-model 64 --steps 2000 --jobs 2
    python -m experiments.bsbr_ablation --preset h100       # the Zoology MQAR sizes

For each chunk size C one BSBR `baselines.MixerLM` trains on MQAR exactly as
`experiments.long_range` trains its bsbr mixer (its `run_mixer`: the same model, curriculum,
batches and checkpoints, under OUT/chunk<C>/). Training is one call per sequence, where every
completed chunk of the call is routed exactly: the bank plays no part in it. The bank is what a
stream keeps, so each trained model is then scored streaming: fresh MQAR sequences of each
--eval-lengths (with --eval-pairs key-value pairs) fed in pieces of C tokens, every completed
chunk going into the bank, once with the exact bank (one slot per chunk) and once per bounded
bank (`bsbr.BankConfig`) of n/d slots, archive included, for each d of --bank-divisors, where
n is the number of chunks of the longest eval sequence; the slots split into two levels
(level 0, then merged pairs) above three. A bank that holds every chunk is the exact one and is
left out.

Per (C, bank): MQAR accuracy and the cross-entropy at the answer positions (the validation
loss) at every eval length, the state bytes of one sequence after the longest, the
forward + backward time of a training step at the curriculum's length (`time_call`; the bank
does not enter it) and the seconds of the streamed scoring. Writes OUT/bsbr_ablation.json,
.md (one table) and .png (accuracy against state bytes, one line per chunk size).
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from baselines.lm import MixerLM

from . import long_range as lr
from . import tasks as T
from .harness import (Choice, Device, Flag, Float, Int, Ints, Optional, OutDir, Stopwatch,
                      default_out, load_torch, markdown_table, option, parse_config, run_meta,
                      save_figure, threads_field, time_call, torch_threads, validate,
                      write_json, write_text)

EVAL_SEED = 30_000          # the scoring batches: the same for every chunk size and bank


@dataclass
class AblationConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu, cuda or cuda:i"))
    threads: int | None = threads_field()
    chunks: tuple = field(default=(32, 64, 128, 256), metadata=option(
        Ints(1), "comma list of BSBR chunk sizes (one model trained per size)"))
    bank_divisors: tuple = field(default=(2, 4), metadata=option(
        Ints(2), "bounded banks of n/d slots (archive included) for each d, n the chunks of "
                 "the longest eval sequence"))
    curriculum: str = field(default="mqar", metadata=option(
        Choice(tuple(T.CURRICULA)), "long_range's curriculum (mqar: T=256, 16 → 32 → 64 "
                                    "pairs)"))
    eval_lengths: tuple = field(default=(256, 512), metadata=option(
        Ints(4), "comma list of sequence lengths to score at"))
    eval_pairs: int = field(default=32, metadata=option(
        Int(0), "key-value pairs per scoring sequence (0: T/4, Zoology's)"))
    vocab: int = field(default=256, metadata=option(Int(8), "vocabulary size"))
    d_model: int = field(default=32, metadata=option(Int(1), "model width"))
    n_layer: int = field(default=2, metadata=option(Int(1), "blocks per model"))
    n_head: int = field(default=2, metadata=option(Int(1), "heads"))
    short_conv: int = field(default=4, metadata=option(
        Int(0), "width of the causal short convolution in front of the mixer (0: none)"))
    steps: int = field(default=30, metadata=option(Int(1), "optimizer steps per chunk size"))
    batch_size: int = field(default=8, metadata=option(Int(1), "training sequences per step"))
    eval_batch: int = field(default=16, metadata=option(
        Int(1), "sequences per scoring length"))
    lr: float = field(default=3e-3, metadata=option(Float(0), "AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=option(Float(0), "AdamW weight decay"))
    seed: int = field(default=0, metadata=option(Int(0), "initialisation and batch seed"))
    jobs: int = field(default=1, metadata=option(
        Int(1), "train this many chunk sizes at once, one spawned process each"))
    max_minutes: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "stop training after this many minutes (each model is scored where "
                            "it stands; --resume continues)", shown="no limit"))
    resume: bool = field(default=False, metadata=option(
        Flag(), "continue each chunk size from its checkpoint under OUT/chunk<C>/"))
    out: str = field(default=default_out("bsbr_ablation"), metadata=option(
        OutDir(), "output folder"))

    def check(self) -> None:
        for C in self.chunks:             # each run's own rules (widths, vocabulary, lengths)
            validate(long_range_config(self, C))
        for L in self.eval_lengths:
            top = T.get_task("mqar").max_difficulty(L, self.vocab)
            if self.eval_pairs > top:
                raise ValueError(f"--eval-pairs: MQAR at length {L} with vocab {self.vocab} "
                                 f"holds at most {top} pairs, got {self.eval_pairs}")


PRESETS = {
    "cpu": dict(threads=1),
    # long_range's Zoology MQAR sizes (vocab 8192, d_model 128, T = 256, 8000 steps); the four
    # small models share the GPU, one process each.
    "h100": dict(device="cuda", jobs=4, **{k: v for k, v in lr.PRESETS["h100"].items()
                                   if k in ("vocab", "d_model", "n_layer", "n_head", "steps",
                                            "batch_size", "eval_batch", "lr",
                                            "weight_decay")},
                 eval_lengths=(256, 512, 1024), eval_pairs=0),
}


def config_from_args(argv=None) -> AblationConfig:
    return parse_config(AblationConfig, PRESETS, argv, prog="python -m experiments.bsbr_ablation",
                        description=__doc__.split("\n\n")[0])


def long_range_config(cfg: AblationConfig, chunk: int) -> lr.LongRangeConfig:
    """The experiments.long_range run that trains the chunk-``chunk`` model."""
    return lr.LongRangeConfig(
        preset=cfg.preset, device=cfg.device, threads=cfg.threads, mixers=("bsbr",),
        curriculum=cfg.curriculum, eval_tasks=("mqar",), eval_lengths=cfg.eval_lengths,
        vocab=cfg.vocab, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
        short_conv=cfg.short_conv, chunk=chunk, steps=cfg.steps, batch_size=cfg.batch_size,
        eval_batch=cfg.eval_batch, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
        log_every=max(1, cfg.steps // 50), max_minutes=cfg.max_minutes, resume=cfg.resume,
        out=str(Path(cfg.out) / f"chunk{chunk}"))


# ----------------------------------------------------------------------------- banks

def bank_slots(capacity: int) -> tuple:
    """slots_per_level of a bounded bank holding ``capacity`` slots with its archive: one level
    up to 3 slots, else level 0 and a level of merged pairs (level 0 the larger)."""
    s = capacity - 1
    return (s,) if s <= 3 else (s - s // 2, s // 2)


def banks_for(cfg: AblationConfig, chunk: int) -> list[tuple | None]:
    """None (the exact bank), then the bounded banks of n/d slots, n = the chunks of the
    longest eval sequence; banks that would hold every chunk (exact) or repeat are left out."""
    n = max(cfg.eval_lengths) // chunk
    out = [None]
    for d in cfg.bank_divisors:
        capacity = max(2, n // d)
        slots = bank_slots(capacity)
        if capacity < n and slots not in out:
            out.append(slots)
    return out


# ----------------------------------------------------------------------------- scoring

def with_bank(model: MixerLM, slots: tuple | None) -> MixerLM:
    """A copy of ``model`` (same weights) whose BSBR layers stream through the given bank."""
    mcfg = model.config
    kw = {**mcfg.mixer_kwargs, "bank": None if slots is None else {"slots_per_level": slots}}
    other = MixerLM(dataclasses.replace(mcfg, mixer_kwargs=kw)).to(model.embed.weight.device)
    other.load_state_dict(model.state_dict())
    return other.eval()


def eval_batch(cfg: AblationConfig, L: int):
    """The fixed MQAR scoring batch at length L: (x, y, mask) on the device."""
    pairs = cfg.eval_pairs or T.get_task("mqar").default_difficulty(L, cfg.vocab)
    x, y, m = T.make("mqar", cfg.eval_batch, L, pairs, cfg.vocab, seed=EVAL_SEED + L)
    return x.to(cfg.device), y.to(cfg.device), m.to(cfg.device)


@torch.no_grad()
def streamed(model: MixerLM, x: torch.Tensor, piece: int):
    """(logits [B,T,V], the state after x): x fed in pieces of ``piece`` tokens."""
    state, outs = None, []
    for s in range(0, x.shape[1], piece):
        logits, state = model(x[:, s:s + piece], state=state, return_state=True)
        outs.append(logits)
    return torch.cat(outs, 1), state


def score(model: MixerLM, cfg: AblationConfig, chunk: int, slots: tuple | None) -> dict:
    """Accuracy and answer loss at every eval length, streamed through the bank ``slots``;
    the state bytes of one sequence after the longest; the seconds the scoring took."""
    m_bank = with_bank(model, slots)
    row = {"chunk": chunk, "bank": "exact" if slots is None else "/".join(map(str, slots)),
           "slots": None if slots is None else sum(slots) + 1}
    with Stopwatch(cfg.device) as sw:
        for L in cfg.eval_lengths:
            x, y, m = eval_batch(cfg, L)
            logits, state = streamed(m_bank, x, chunk)
            row[f"acc T={L}"] = T.accuracy(logits, y, m)["acc"]
            row[f"loss T={L}"] = float(F.cross_entropy(logits[m].float(), y[m]))
    row["state bytes"] = state.nbytes() // x.shape[0]
    row["scoring s"] = sw.seconds
    return row


def train_step_ms(model: MixerLM, cfg: AblationConfig) -> float:
    """Median ms of one training forward + backward (the long_range loss: the answer rows) on
    an MQAR batch at the curriculum's first length."""
    phase = T.CURRICULA[cfg.curriculum][0]
    x, y, m = T.make(phase.tasks[0], cfg.batch_size, phase.length, None, cfg.vocab, seed=1)
    x, y, m = x.to(cfg.device), y.to(cfg.device), m.to(cfg.device)
    model.train()

    def step():
        F.cross_entropy(model.head(model.features(x)[m]).float(), y[m]).backward()
    params = list(model.parameters())
    ms = time_call(step, cfg.device, grad_to_none=params).median_ms
    model.eval()
    return ms


def load_long_range_model(path, device) -> tuple[MixerLM, lr.LongRangeConfig, str]:
    """(model in eval mode on ``device``, its long_range config, its mixer) from a checkpoint of
    `experiments.long_range` (OUT/<mixer>/ckpt/state.pt)."""
    saved = load_torch(path, "long_range checkpoint", map_location="cpu",
                       fix="pass OUT/<mixer>/ckpt/state.pt of an experiments.long_range run")
    names = {f.name for f in dataclasses.fields(lr.LongRangeConfig)}
    lcfg = lr.LongRangeConfig(**{k: v for k, v in saved["config"].items() if k in names})
    lcfg.device = str(device)
    mixer = saved["log"]["mixer"]
    model = lr.build_model(lcfg, mixer)
    model.load_state_dict(saved["model"])
    return model.eval(), lcfg, mixer


def trained_model(cfg: AblationConfig, chunk: int) -> MixerLM:
    path = lr.checkpoint_path(long_range_config(cfg, chunk), "bsbr")
    return load_long_range_model(path, cfg.device)[0]


def train_all(cfg: AblationConfig) -> dict:
    """Train (or resume) every chunk size through long_range's run_mixer; returns each log."""
    deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
    args = [(long_range_config(cfg, C), "bsbr", deadline) for C in cfg.chunks]
    if cfg.jobs > 1 and len(args) > 1:
        with mp.get_context("spawn").Pool(min(cfg.jobs, len(args))) as pool:
            logs = pool.starmap(lr.run_mixer, args)
    else:
        logs = [lr.run_mixer(*a) for a in args]
    return dict(zip(cfg.chunks, logs))


# ----------------------------------------------------------------------------- outputs

def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = max(result["config"]["eval_lengths"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    chunks = list(dict.fromkeys(r["chunk"] for r in result["rows"]))
    for i, C in enumerate(chunks):
        rows = [r for r in result["rows"] if r["chunk"] == C]
        pts = sorted((r["state bytes"] / 1024, r[f"acc T={L}"],
                      "exact" if r["slots"] is None else f"{r['slots']} slots") for r in rows)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, color=f"C{i}",
                label=f"chunk {C}")
        for x, y, name in pts:
            a1.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        exact = next(r for r in rows if r["bank"] == "exact")
        a2.bar(i, exact["fwd+bwd ms"], color=f"C{i}")
    a1.set_xscale("log", base=2)
    a1.set(xlabel=f"state of one sequence after T={L} (KiB, all layers)",
           ylabel=f"MQAR accuracy at T={L}", ylim=(-0.02, 1.02),
           title="accuracy vs state: exact bank, then bounded banks")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xticks(range(len(chunks)), [f"chunk {C}" for C in chunks])
    a2.set(ylabel="ms", title="training forward + backward (one step)")
    a2.grid(alpha=0.3, axis="y")
    meta = result["meta"]
    fig.suptitle(f"BSBR ablation on MQAR — {meta['device']}, commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    write_json(out / "bsbr_ablation.json", result)
    c = result["config"]
    text = "\n\n".join([
        "# BSBR ablation on MQAR: chunk size and bank compression",
        f"{result['meta']['date']} · {result['meta']['device']} · commit "
        f"{result['meta']['commit']} · preset {c['preset']} · vocab {c['vocab']}, d_model "
        f"{c['d_model']}, {c['n_layer']} layers, {c['n_head']} heads, {c['steps']} steps of "
        f"batch {c['batch_size']} (curriculum {c['curriculum']}); scored streaming in pieces "
        f"of one chunk, {c['eval_pairs'] or 'T/4'} pairs, {c['eval_batch']} sequences",
        markdown_table(result["rows"])])
    write_text(out / "bsbr_ablation.md", text + "\n")
    plot(result, out / "bsbr_ablation.png")


def main(argv=None) -> dict:
    cfg = config_from_args(argv)
    out = Path(cfg.out)
    logs = train_all(cfg)
    result = {"meta": run_meta(cfg.device), "config": dataclasses.asdict(cfg), "rows": [],
              "training": {str(C): {"status": g["status"], "curriculum": g.get("curriculum"),
                                    "train": g["train"][-1:]} for C, g in logs.items()}}
    with torch_threads(cfg.threads):
        for C in cfg.chunks:
            model = trained_model(cfg, C)
            ms = train_step_ms(model, cfg)
            for slots in banks_for(cfg, C):
                row = score(model, cfg, C, slots)
                last = logs[C]["train"][-1] if logs[C]["train"] else {}
                row.update({"fwd+bwd ms": ms, "steps": (logs[C].get("sessions") or [{}])[-1]
                            .get("end_step"), "train acc": last.get("acc")})
                result["rows"].append(row)
                print(f"chunk {C} bank {row['bank']}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in row.items() if k.startswith("acc")))
            write_outputs(result, out)
    print(markdown_table(result["rows"]))
    print(f"results: {out}/bsbr_ablation.json, .md, .png")
    return result


if __name__ == "__main__":
    main()

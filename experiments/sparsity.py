"""Emergent sparsity: train BDH and a parameter-matched GPT-2 side by side, watch activations.

    python -m experiments.sparsity [--device cpu|cuda] [--steps N] [--out DIR] [--preset cpu|h100]
                                   [--record-steps 0,100,500] [--models bdh,gpt2]
                                   [--ckpt-dir DIR] [--resume] [--max-minutes M] [--compile]
                                   [--bdh n_layer=2,n_embd=64]

Both models train with `experiments.train` (same data, tokens and optimizer settings). At the
record steps (default 0, 100, 500 and the final step, clipped to the run) each model is run, in
eval mode and float32, on one fixed batch of held-out validation text, and we record:

* BDH, every layer: density = fraction of entries > 0 of xs, ys and xy (bdh.SparsityProbe);
* GPT-2, every layer: "mlp" = fraction of MLP activations (the GELU output) with |a| > 1e-4, and
  "mlp_exact_zero" = fraction exactly 0 (GELU is almost never exactly 0, so this says how
  different the two kinds of "sparse" are);
* heatmaps: tokens × a fixed random sample of 64 neurons of the last layer (BDH xy, GPT-2 MLP),
  the same text and neurons at every step.

Outputs in DIR (default runs/sparsity, gitignored; the committed figures change only with
--out results/sparsity): sparsity.json ({"meta", "records", "loss"}), sparsity.md, heatmaps/
(arrays and one PNG per step), sparsity_heatmaps.png (steps side by side), sparsity_density.png
(per activation the mean over layers with a min-max band) and
sparsity_loss.png. Results are written as they are made; with --resume a run that was stopped
(--max-minutes, or a lost machine) continues from its checkpoints and keeps what it recorded.
--max-minutes is one deadline for the whole command (both models), so a run fits a fixed slot;
the figures and the table of what exists so far are written whenever the command stops.

The default CPU run (120 steps per model, one torch thread) takes 35 to 50 s (measured on a
2-core CPU shared with other work).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glassbrain.atomic_file import atomic_write

from . import train as tr
from .data import ByteBatcher, load_corpus
from .harness import (Device, Flag, Float, Int, Ints, Names, Optional, OutDir, default_out,
                      markdown_table, option, parse_config, run_meta, save_figure, validate,
                      write_json, write_text)

N_SAMPLE = 64            # neurons shown in the heatmaps
SHOW_TOKENS = 128        # tokens shown in the heatmaps
GELU_EPS = 1e-4


def eval_batch(corpus, block_size: int, device) -> torch.Tensor:
    """The fixed held-out batch: 4 windows of validation text, the same for both models."""
    return ByteBatcher(corpus["val"], block_size, 4, seed=4242).next()[0].to(device)


def bdh_record(model, x, neurons):
    from bdh import SparsityProbe
    last = model.config.n_layer - 1
    with SparsityProbe(model, keep={"xy": neurons}) as probe:
        model(x)
    recs = [{"layer": layer, "name": name, "density": d[name]}
            for layer, d in enumerate(probe.densities()) for name in ("xs", "ys", "xy")]
    heat = probe.activations[(last, "xy")][0, :SHOW_TOKENS].float().cpu().numpy()
    return recs, heat


def gpt2_mlp_stats(acts: list[torch.Tensor]) -> list[dict]:
    """Per layer: fraction with |a| > 1e-4 ("mlp") and fraction exactly 0 ("mlp_exact_zero")."""
    out = []
    for layer, a in enumerate(acts):
        a = a.float()
        out.append({"layer": layer, "name": "mlp",
                    "density": float((a.abs() > GELU_EPS).float().mean())})
        out.append({"layer": layer, "name": "mlp_exact_zero",
                    "density": float((a == 0).float().mean())})
    return out


def gpt2_record(model, x, neurons):
    blocks = model.hf.transformer.h
    acts = [None] * len(blocks)
    handles = [b.mlp.act.register_forward_hook(
        lambda _m, _i, out, i=i: acts.__setitem__(i, out.detach())) for i, b in enumerate(blocks)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    heat = acts[-1][0, :SHOW_TOKENS][:, neurons].float().cpu().numpy()
    return gpt2_mlp_stats(acts), heat


# ----------------------------------------------------------------------------- plots

def plot_all(out: Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, losses = result["records"], result["loss"]
    models = [m for m in ("bdh", "gpt2") if any(r["model"] == m for r in records)]
    steps = sorted({r["step"] for r in records})
    heat_name = {"bdh": "BDH xy (last layer)", "gpt2": "GPT-2 MLP GELU (last layer)"}

    def heat(model, step):
        f = out / "heatmaps" / f"{model}_step{step}.npy"
        return np.load(f) if f.exists() else None

    # One PNG per step, and all steps side by side.
    for step in steps:
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, m in zip(axes[0], models):
            h = heat(m, step)
            if h is not None:
                im = ax.imshow(h.T, aspect="auto", cmap="magma", interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.04)
            ax.set_title(f"{heat_name[m]}, step {step}", fontsize=9)
            ax.set_xlabel("token")
            ax.set_ylabel("neuron (fixed sample)")
        fig.tight_layout()
        save_figure(fig, out / "heatmaps" / f"step{step}.png", dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(len(models), len(steps), figsize=(3.2 * len(steps), 2.8 * len(models)),
                             squeeze=False)
    for i, m in enumerate(models):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            h = heat(m, step)
            if h is not None:
                ax.imshow(h.T, aspect="auto", cmap="magma", interpolation="nearest")
            ax.set_title(f"{m} step {step}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("activations on the same held-out text: tokens (x) × sampled neurons (y)",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "sparsity_heatmaps.png", dpi=110)
    plt.close(fig)

    # Density against step: per model and activation, the mean over layers with a min-max band
    # (one line per activation, not one per layer: 6 layers x 3 activations overlap unreadably).
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        plot_density(ax, records, m)
    fig.tight_layout()
    save_figure(fig, out / "sparsity_density.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in models:
        for split, style in (("train", "-"), ("val", "--")):
            pts = sorted((r["step"], r["loss"]) for r in losses
                         if r["model"] == m and r["split"] == split)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{m} {split}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "sparsity_loss.png", dpi=110)
    plt.close(fig)


def density_bands(records: list[dict], model: str) -> dict:
    """{activation name: (steps, mean over layers, min over layers, max over layers)} for one
    model's records, steps ascending."""
    order = ("xs", "ys", "xy", "mlp", "mlp_exact_zero")
    names = {r["name"] for r in records if r["model"] == model}
    out = {}
    for name in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n)):
        by_step: dict[int, list[float]] = {}
        for r in records:
            if r["model"] == model and r["name"] == name:
                by_step.setdefault(r["step"], []).append(r["density"])
        steps = sorted(by_step)
        out[name] = (steps, [float(np.mean(by_step[s])) for s in steps],
                     [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])
    return out


def plot_density(ax, records: list[dict], model: str) -> None:
    """One line per activation (mean over layers) with its min-max band across layers."""
    bands = density_bands(records, model)
    n_layers = len({r["layer"] for r in records if r["model"] == model})
    for name, (steps, mean, lo, hi) in bands.items():
        style = "--" if name == "mlp_exact_zero" else "-"
        line, = ax.plot(steps, mean, style, marker="o", label=f"{name} (mean of {n_layers} layers)")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_title(f"{model}: density (fraction active) against step; band: min-max over layers",
                 fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("density")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def table(result: dict) -> str:
    steps = sorted({r["step"] for r in result["records"]})
    rows = {}
    for r in result["records"]:
        key = (r["model"], r["name"], r["layer"])
        rows.setdefault(key, {"model": r["model"], "name": r["name"], "layer": r["layer"]})
        rows[key][f"step {r['step']}"] = r["density"]
    body = markdown_table(list(rows.values()),
                          ["model", "name", "layer"] + [f"step {s}" for s in steps])
    val = []
    for m in ("bdh", "gpt2"):
        vals = [r for r in result["loss"] if r["model"] == m and r["split"] == "val"]
        if vals:
            val.append(f"{m} final val loss {max(vals, key=lambda r: r['step'])['loss']:.4f}")
    legend = ("density = fraction of activations on one fixed held-out batch that count as "
              "active. BDH xs, ys, xy: fraction > 0 (ReLU outputs; xy = xs·ys before dropout). "
              f"GPT-2 mlp: fraction of MLP GELU outputs with |a| > {GELU_EPS:g}; "
              "mlp_exact_zero: fraction exactly 0 (not a density of active units: GELU is "
              "almost never exactly 0).")
    return body + "\n\n" + legend + "\n\n" + "; ".join(val)


# ----------------------------------------------------------------------------- config

@dataclass
class SparsityConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "where to train"))
    steps: int = field(default=120, metadata=option(Int(1), "training steps per model"))
    out: str = field(default=default_out("sparsity"), metadata=option(
        OutDir(), "output folder (gitignored by default; the committed figures are rewritten "
                  "only with --out results/sparsity)"))
    record_steps: tuple | None = field(default=None, metadata=option(
        Optional(Ints(0)), "comma list of steps at which densities and heatmaps are recorded "
                           "(steps past --steps are dropped; the final step is always "
                           "recorded)",
        shown="0, a quarter, half and all of --steps; with --preset h100 0,100,500 and the "
              "final step"))
    models: tuple = field(default=("bdh", "gpt2"), metadata=option(
        Names(("bdh", "gpt2")), "comma list of bdh, gpt2"))
    ckpt_dir: str | None = field(default=None, metadata=option(
        Optional(OutDir()), "training checkpoints, one per model", shown="<out>/ckpt"))
    resume: bool = field(default=False, metadata=option(
        Flag(), "continue from the checkpoints and keep the records in --out"))
    max_minutes: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "stop (with checkpoints) after this long, both models together; "
                            "rerun the same command with --resume", shown="no limit"))
    compile: bool = field(default=False, metadata=option(
        Flag(), "torch.compile the training forward"))
    seed: int = field(default=tr.TrainConfig.seed, metadata=option(Int(0), "training seed"))
    bdh: dict = field(default_factory=dict, metadata=option(
        tr.BDH_OVERRIDES, "BDHConfig fields over the preset's (the GPT-2 is matched to this "
                          "BDH)", shown="experiments.train's preset of the same name"))

    def check(self) -> None:
        validate(train_config(self))         # what the two training runs will be given


PRESETS = {
    # Tiny models (experiments.train's cpu preset) for fewer steps than a training run.
    "cpu": dict(device="cpu", steps=120, bdh=tr.PRESETS["cpu"]["bdh"]),
    # The official BDH training setting.
    "h100": dict(device="cuda", steps=3000, bdh=tr.PRESETS["h100"]["bdh"]),
}


def default_record_steps(steps: int) -> list[int]:
    if steps >= 1000:
        return sorted({s for s in (0, 100, 500) if s < steps} | {steps})
    return sorted({0, steps // 4, steps // 2, steps})


def train_config(cfg: SparsityConfig) -> tr.TrainConfig:
    """The experiments.train settings both models train with: its preset of the same name,
    with this command's BDH, steps, device, seed and paths."""
    base = tr.TrainConfig(preset=cfg.preset, **tr.PRESETS[cfg.preset])
    base.bdh = dict(cfg.bdh)
    base.device, base.steps, base.seed, base.compile = cfg.device, cfg.steps, cfg.seed, \
        cfg.compile
    base.ckpt_dir = cfg.ckpt_dir or str(Path(cfg.out) / "ckpt")
    base.resume, base.max_minutes = cfg.resume, cfg.max_minutes
    return base


def parse(argv=None, bdh_sizes: dict | None = None) -> SparsityConfig:
    """The config of a command line; ``bdh_sizes`` replaces the preset's BDH (--bdh applies
    over it)."""
    presets = PRESETS if bdh_sizes is None else {
        name: {**preset, "bdh": bdh_sizes} for name, preset in PRESETS.items()}
    return parse_config(SparsityConfig, presets, argv, prog="python -m experiments.sparsity",
                        description=__doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------- the run

def new_result(base: tr.TrainConfig, record_steps: list[int], path: Path, resume: bool) -> dict:
    """The result so far (read back with --resume), its metadata brought up to this run."""
    result = (json.loads(path.read_text()) if resume and path.exists() else
              {"meta": run_meta(base.device, preset=base.preset, record_steps=record_steps,
                                gelu_threshold=GELU_EPS, heatmap_layer="last",
                                definition="density = fraction of activations > 0 (BDH); "
                                           "|GELU| > 1e-4 and == 0 (GPT-2); fixed held-out "
                                           "batch of 4×block_size validation bytes, eval "
                                           "mode, float32"),
               "records": [], "loss": []})
    result["meta"].update(
        steps=base.steps, record_steps=record_steps,
        tokens_per_step=base.batch_size * base.block_size * base.grad_accum,
        train_config={k: v for k, v in tr.asdict(base).items()
                      if k not in ("model", "out", "resume", "max_minutes")},
        heatmap={"layer": "last", "tokens": SHOW_TOKENS, "neurons": N_SAMPLE,
                 "neuron_sample": "sorted torch.randperm(width, generator seed 0)[:64]"})
    return result


def record_hook(m: str, x, out: Path, result: dict, record_steps: list[int]):
    """The training hook that records model ``m``'s densities and heatmap at the record steps
    (each once, also across --resume)."""
    done = {r["step"] for r in result["records"] if r["model"] == m}

    def hook(step, model, log):
        if step not in record_steps or step in done:
            return
        g = torch.Generator().manual_seed(0)              # the same neurons at every step
        if m == "bdh":
            C = model.config
            ids = torch.randperm(C.n_head * C.N, generator=g)[:N_SAMPLE].sort().values
            recs, heat = bdh_record(model, x, ids.tolist())
        else:
            width = model.hf.config.n_inner or 4 * model.hf.config.n_embd
            ids = torch.randperm(width, generator=g)[:N_SAMPLE].sort().values
            recs, heat = gpt2_record(model, x, ids)
        atomic_write(out / "heatmaps" / f"{m}_step{step}.npy", lambda f: np.save(f, heat))
        result["records"].extend({"model": m, "step": step, **r} for r in recs)
        done.add(step)
        write_json(out / "sparsity.json", result)
    return hook


def drop_orphan_records(result: dict, m: str, ckpt_dir: str) -> None:
    """Records without the checkpoint they came from belong to another run (say, a committed
    result in --out): this run trains from step 0 and records afresh."""
    if not (Path(ckpt_dir) / f"{m}.pt").exists() and any(
            r["model"] == m for r in result["records"]):
        print(f"--resume: no {m} checkpoint in {ckpt_dir}; dropping {m}'s old records")
        result["records"] = [r for r in result["records"] if r["model"] != m]
        result["loss"] = [r for r in result["loss"] if r["model"] != m]


def add_training_log(result: dict, m: str, log: dict) -> None:
    """Model ``m``'s parameter count, status, speed and loss curves, from its training log."""
    meta, rm = log["meta"], result["meta"]
    rm[f"{m}_params"] = meta["params"]
    if "matched_to_bdh_params" in meta:
        rm[f"{m}_matched_to_bdh_params"] = meta["matched_to_bdh_params"]
    rm[f"{m}_status"] = log["status"]
    rm[f"{m}_config"] = {k: v for k, v in meta.items() if k.endswith("_config")}
    if "peak_memory_bytes" in meta:
        rm[f"{m}_peak_memory_bytes"] = meta["peak_memory_bytes"]
    if log["train"]:
        rm[f"{m}_tok_s_median"] = float(np.median([r["tok_s"] for r in log["train"]]))
    result["loss"] = [r for r in result["loss"] if r["model"] != m]
    result["loss"] += [{"model": m, "step": r["step"], "split": split, "loss": r["loss"]}
                       for split in ("train", "val") for r in log[split]]


def finish(out: Path, result: dict, complete: bool) -> None:
    """Table and figures of what has been recorded; a plotting failure never loses the JSON."""
    if not result["records"]:
        return
    md = ""
    try:
        md = table(result)
        write_text(out / "sparsity.md", md + "\n")
        plot_all(out, result)
    except Exception as exc:                                      # noqa: BLE001
        print(f"table/plots failed ({type(exc).__name__}: {exc}); {out}/sparsity.json is "
              f"complete, rerun with --resume to redo them")
    print(md)
    print(f"wrote {out}/sparsity.json, sparsity.md and the PNGs"
          + ("" if complete else " (partial: rerun the same command with --resume)"))


def main(argv=None, corpus=None, bdh_sizes: dict | None = None) -> dict:
    cfg = parse(argv, bdh_sizes)
    # One deadline for both models: the command as a whole must fit its time slot.
    deadline = None if cfg.max_minutes is None else time.time() + 60 * cfg.max_minutes
    base = train_config(cfg)
    record_steps = sorted(s for s in set(cfg.record_steps or default_record_steps(cfg.steps))
                          | {cfg.steps} if s <= cfg.steps)
    out = Path(cfg.out)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else load_corpus("shakespeare")
    result = new_result(base, record_steps, out / "sparsity.json", cfg.resume)
    x = eval_batch(corpus, base.block_size, base.device)
    for m in cfg.models:
        drop_orphan_records(result, m, base.ckpt_dir)
        run = tr.TrainConfig(**{**tr.asdict(base), "model": m, "out": str(out / f"train_{m}")})
        log = tr.train(run, corpus, hook=record_hook(m, x, out, result, record_steps),
                       deadline=deadline)
        add_training_log(result, m, log)
        write_json(out / "sparsity.json", result)
        if log["status"] != "finished":
            print(f"{m} stopped at the time limit; rerun the same command with --resume")
            finish(out, result, complete=False)
            return result
    finish(out, result, complete=True)
    return result


if __name__ == "__main__":
    main()

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
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import train as tr
from .data import ByteBatcher, load_corpus
from glassbrain.atomic_file import atomic_write

from .results import default_out, markdown_table, run_meta, save_figure, write_json, write_text

N_SAMPLE = 64            # neurons shown in the heatmaps
SHOW_TOKENS = 128        # tokens shown in the heatmaps
GELU_EPS = 1e-4


def default_record_steps(steps: int) -> list[int]:
    return sorted({s for s in (0, 100, 500) if s < steps} | {steps})


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
        out.append({"layer": layer, "name": "mlp", "density": float((a.abs() > GELU_EPS).float().mean())})
        out.append({"layer": layer, "name": "mlp_exact_zero", "density": float((a == 0).float().mean())})
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
    val = [f"{m} final val loss {max((r for r in result['loss'] if r['model'] == m and r['split'] == 'val'), key=lambda r: r['step'])['loss']:.4f}"
           for m in ("bdh", "gpt2") if any(r["model"] == m and r["split"] == "val"
                                            for r in result["loss"])]
    legend = ("density = fraction of activations on one fixed held-out batch that count as "
              "active. BDH xs, ys, xy: fraction > 0 (ReLU outputs; xy = xs·ys before dropout). "
              f"GPT-2 mlp: fraction of MLP GELU outputs with |a| > {GELU_EPS:g}; "
              "mlp_exact_zero: fraction exactly 0 (not a density of active units: GELU is "
              "almost never exactly 0).")
    return body + "\n\n" + legend + "\n\n" + "; ".join(val)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    # Flags whose default comes from --preset use SUPPRESS and state it in their help.
    late = argparse.SUPPRESS
    p = argparse.ArgumentParser(prog="python -m experiments.sparsity",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=late,
                   help="where to train (default: cpu with --preset cpu, cuda with --preset h100)")
    p.add_argument("--steps", type=int, default=late,
                   help="training steps per model (default: "
                        + ", ".join(f"{tr.PRESETS[k]['steps']} with --preset {k}"
                                    for k in sorted(tr.PRESETS)) + ")")
    p.add_argument("--out", default=default_out("sparsity"),
                   help="output folder (gitignored by default; the committed figures are "
                        "rewritten only with --out results/sparsity)")
    p.add_argument("--preset", choices=sorted(tr.PRESETS), default="cpu",
                   help="cpu: tiny models, about a minute on a laptop; h100: the official BDH "
                        "training setting")
    p.add_argument("--record-steps", default=late,
                   help="comma list of steps at which densities and heatmaps are recorded "
                        "(default: 0,100,500 and the final step, clipped to --steps)")
    p.add_argument("--models", default="bdh,gpt2", help="comma list of bdh, gpt2")
    p.add_argument("--ckpt-dir", default=late,
                   help="training checkpoints, one per model (default: <out>/ckpt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints and keep the records in --out")
    p.add_argument("--max-minutes", type=float, default=late,
                   help="stop (with checkpoints) after this long, both models together; "
                        "rerun the same command with --resume (default: no limit)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--seed", type=int, default=late,
                   help=f"training seed (default: {tr.TrainConfig.seed})")
    p.add_argument("--bdh", default=late, metavar="K=V,...",
                   help="BDHConfig fields over the preset's (the GPT-2 is matched to this BDH); "
                        "default: the preset's")
    return p


def parse(argv=None):
    absent = ("device", "steps", "record_steps", "ckpt_dir", "max_minutes", "seed", "bdh")
    return build_parser().parse_args(argv,
                                     namespace=argparse.Namespace(**dict.fromkeys(absent)))


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
    a = parse(argv)
    # One deadline for both models: the command as a whole must fit its time slot.
    deadline = None if a.max_minutes is None else time.time() + 60 * a.max_minutes
    out = Path(a.out)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        if m not in ("bdh", "gpt2"):
            raise SystemExit(f"--models: expected bdh and/or gpt2, got {m!r}")
    base = tr.TrainConfig(preset=a.preset, **tr.PRESETS[a.preset])
    if a.device:
        base.device = a.device
    if a.steps is not None:
        base.steps = a.steps
    base.bdh = dict(bdh_sizes if bdh_sizes is not None else base.bdh)
    if a.bdh:
        base.bdh.update(tr.parse_overrides(a.bdh, tr.bdh_fields()))
    if a.seed is not None:
        base.seed = a.seed
    base.compile = a.compile
    base.ckpt_dir = a.ckpt_dir or str(out / "ckpt")
    base.resume, base.max_minutes = a.resume, a.max_minutes
    tr.check_config(base)
    try:
        wanted = {int(s) for s in a.record_steps.split(",") if s.strip()} if a.record_steps \
            else set(default_record_steps(base.steps))
    except ValueError:
        raise SystemExit(f"--record-steps: expected a comma list of ints, "
                         f"got {a.record_steps!r}") from None
    record_steps = sorted(s for s in wanted | {base.steps} if 0 <= s <= base.steps)

    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else load_corpus("shakespeare")
    path = out / "sparsity.json"
    result = (json.loads(path.read_text()) if a.resume and path.exists() else
              {"meta": run_meta(base.device, preset=a.preset, record_steps=record_steps,
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
    x = eval_batch(corpus, base.block_size, base.device)

    for m in models:
        cfg = tr.TrainConfig(**{**tr.asdict(base), "model": m, "out": str(out / f"train_{m}")})
        if not (Path(base.ckpt_dir) / f"{m}.pt").exists() and any(
                r["model"] == m for r in result["records"]):
            # Records without the checkpoint they came from belong to another run (say, a
            # committed result in DIR): this run trains from step 0 and records afresh.
            print(f"--resume: no {m} checkpoint in {base.ckpt_dir}; dropping {m}'s old records")
            result["records"] = [r for r in result["records"] if r["model"] != m]
            result["loss"] = [r for r in result["loss"] if r["model"] != m]
        done = {r["step"] for r in result["records"] if r["model"] == m}

        def hook(step, model, log, m=m, done=done):
            if step not in record_steps or step in done:
                return
            g = torch.Generator().manual_seed(0)          # the same neurons at every step
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
            write_json(path, result)

        log = tr.train(cfg, corpus, hook=hook, deadline=deadline)
        meta = log["meta"]
        result["meta"][f"{m}_params"] = meta["params"]
        if "matched_to_bdh_params" in meta:
            result["meta"][f"{m}_matched_to_bdh_params"] = meta["matched_to_bdh_params"]
        result["meta"][f"{m}_status"] = log["status"]
        result["meta"][f"{m}_config"] = {k: v for k, v in meta.items() if k.endswith("_config")}
        if "peak_memory_bytes" in meta:
            result["meta"][f"{m}_peak_memory_bytes"] = meta["peak_memory_bytes"]
        if log["train"]:
            result["meta"][f"{m}_tok_s_median"] = float(np.median([r["tok_s"]
                                                                   for r in log["train"]]))
        result["loss"] = [r for r in result["loss"] if r["model"] != m]
        result["loss"] += [{"model": m, "step": r["step"], "split": "train", "loss": r["loss"]}
                           for r in log["train"]]
        result["loss"] += [{"model": m, "step": r["step"], "split": "val", "loss": r["loss"]}
                           for r in log["val"]]
        write_json(path, result)
        if log["status"] != "finished":
            print(f"{m} stopped at the time limit; rerun the same command with --resume")
            finish(out, result, complete=False)
            return result
    finish(out, result, complete=True)
    return result


if __name__ == "__main__":
    main()

"""Is BSBR's speed bought with a broken model? Trains the BSBR LM, BDH and GPT-2 (both matched to
the preset's BDH by parameter count) on the same bytes, with the same steps, batches, optimizer
and seed, and compares their loss curves.

    python -m experiments.quality                       # CPU: tiny models, about two minutes
    python -m experiments.quality --steps 400           # longer
    python -m experiments.quality --preset h100         # the official BDH size on a GPU

Each model trains through `experiments.train` (checkpointed under OUT/<model>/ckpt, so a run
stopped by --max-minutes continues with --resume). Writes OUT/quality.json (per model: params,
the train and validation curves, tokens/s), OUT/quality.md and OUT/quality.png.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .results import markdown_table, run_meta, save_figure, write_json, write_text
from .train import PRESETS, TrainConfig, train

MODELS = ("bsbr", "bdh", "gpt2")


def parse(argv=None) -> tuple[list[str], TrainConfig, str]:
    p = argparse.ArgumentParser(prog="python -m experiments.quality",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="training sizes (experiments.train presets)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per model")
    p.add_argument("--eval-every", type=int, default=20, help="validation every N steps")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop each model after this long (continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in OUT")
    p.add_argument("--out", default="runs/quality", help="output folder")
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"--models: unknown {bad or a.models!r}; expected a comma list of {MODELS}")
    if a.steps < 1 or a.eval_every < 1:
        p.error(f"--steps and --eval-every must be >= 1, got {a.steps}, {a.eval_every}")
    base = TrainConfig(preset=a.preset, **PRESETS[a.preset])
    base = dataclasses.replace(base, steps=a.steps, eval_every=a.eval_every,
                               max_minutes=a.max_minutes, resume=a.resume)
    return models, base, a.out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in result["models"].items():
        line, = ax.plot([e["step"] for e in r["val"]], [e["loss"] for e in r["val"]], "-o",
                        ms=3, label=f"{name} val ({r['params'] / 1e6:.2f}M params)")
        ax.plot([e["step"] for e in r["train"]], [e["loss"] for e in r["train"]], ":",
                color=line.get_color(), alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte); dotted: train")
    m = result["meta"]
    ax.set_title(f"same bytes, same steps: {m['device']}, commit {m.get('commit') or 'unknown'}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None, corpus=None) -> dict:
    models, base, out = parse(argv)
    out = Path(out)
    result = {"meta": run_meta(base.device, preset=base.preset, steps=base.steps,
                               batch_size=base.batch_size, block_size=base.block_size),
              "models": {}}
    for name in models:
        cfg = dataclasses.replace(base, model=name, out=str(out / name),
                                  ckpt_dir=str(out / name / "ckpt"))
        log = train(cfg, corpus=corpus)
        result["models"][name] = {
            "params": log["meta"]["params"],
            "status": log["status"],
            "train": [{"step": e["step"], "loss": e["loss"]} for e in log["train"]],
            "val": [{"step": e["step"], "loss": e["loss"]} for e in log["val"]],
            "tok_per_s": log["train"][-1].get("tok_s") if log["train"] else None,
        }
        write_json(out / "quality.json", result)
    rows = [{"model": n, "params": r["params"], "status": r["status"],
             "final val loss": r["val"][-1]["loss"] if r["val"] else None,
             "best val loss": min((e["loss"] for e in r["val"]), default=None),
             "tok/s": r["tok_per_s"]} for n, r in result["models"].items()]
    md = markdown_table(rows) + "\n"
    write_text(out / "quality.md", md)
    plot(result, out / "quality.png")
    print(md)
    return result


if __name__ == "__main__":
    main()

"""Is BSBR's speed bought with a broken model? Trains the BSBR LM, BDH and GPT-2 (both matched to
the preset's BDH by parameter count) on the same bytes, with the same steps, batches, optimizer
and seed, and compares their loss curves.

    python -m experiments.quality                       # CPU: tiny models, about 25 s
    python -m experiments.quality --steps 400           # longer
    python -m experiments.quality --preset h100         # the official BDH size on a GPU

Each model trains through `experiments.train` (checkpointed under OUT/<model>/ckpt, so a run
stopped by --max-minutes continues with --resume). Writes OUT/quality.json (per model: params,
the train and validation curves, tokens/s), OUT/quality.md and OUT/quality.png.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .harness import (Flag, Float, Int, Names, Optional, OutDir, default_out, markdown_table,
                      option, parse_config, run_meta, save_figure, validate, write_json,
                      write_text)
from .train import PRESETS as TRAIN_PRESETS
from .train import TrainConfig, train

MODELS = ("bsbr", "bdh", "gpt2")


@dataclass
class QualityConfig:
    preset: str = "cpu"
    models: tuple = field(default=MODELS, metadata=option(
        Names(MODELS), "comma list of the models to train"))
    steps: int = field(default=60, metadata=option(Int(1), "optimizer steps per model"))
    eval_every: int = field(default=20, metadata=option(Int(1), "validation every N steps"))
    max_minutes: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "stop each model after this long (continue with --resume)",
        shown="no limit"))
    resume: bool = field(default=False, metadata=option(
        Flag(), "continue from the checkpoints in --out"))
    out: str = field(default=default_out("quality"), metadata=option(OutDir(), "output folder"))

    def train_config(self) -> TrainConfig:
        """What every model trains with: experiments.train's preset of the same name, with
        these steps, evaluations and time limit."""
        base = TrainConfig(preset=self.preset, **TRAIN_PRESETS[self.preset])
        return dataclasses.replace(base, steps=self.steps, eval_every=self.eval_every,
                                   max_minutes=self.max_minutes, resume=self.resume)

    def check(self) -> None:
        try:
            validate(self.train_config())
        except ValueError as exc:
            raise ValueError(f"--preset: {self.preset} trains with {exc}") from None


PRESETS = {name: {} for name in TRAIN_PRESETS}        # the training sizes are train's presets


def parse(argv=None) -> QualityConfig:
    return parse_config(QualityConfig, PRESETS, argv, prog="python -m experiments.quality",
                        description=__doc__.split("\n\n")[0])


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
    cfg = parse(argv)
    models, base, out = cfg.models, cfg.train_config(), Path(cfg.out)
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

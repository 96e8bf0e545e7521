"""Is sparse decoding the same model? Teacher-forced logits of the sparse and the dense step.

    python -m experiments.sparse_exactness                       # CPU: about a minute
    python -m experiments.sparse_exactness --checkpoint CKPT     # also a trained BDH
    python -m experiments.sparse_exactness --preset h100 --checkpoint CKPT

Greedy tokens cannot tell a near-tie from a bug: once one token differs, the two continuations
read different text and every later difference is expected. Here both paths read the same
tokens. From one prefilled state (the prompt through the chunked kernel), a dense
`bdh.decode.BDHDecoder` ("eager", a CUDA graph on CUDA) and a sparse one (mode "sparse") each
step on their own copy of the state, fed the same token at every step: the next byte of a real
text (trained weights, ``--forcing text``) or the dense path's own greedy choice (``greedy``).
Per step and row:

* rel = ‖l_sparse − l_dense‖ / ‖l_dense‖ over the vocabulary (float64), max and mean over rows;
* whether the top-1 token differs and, where it does, the dense margin between its top two
  logits, also over ‖l_dense‖ (a near-tie has a small one: a flip needs a margin of at most
  √2 ‖l_sparse − l_dense‖, so a flip at a margin far above the difference is impossible, and a
  large rel is what a bug looks like).

The bound. Both paths compute the same function: the sparse one skips the products of exactly
zero activations (ReLU zeros) and sums the rest in another order. In float32 they may differ
only by summation order, so rel must stay at float32 rounding, ~1e-6 (we hold 1e-5 as the line,
tests/models/test_sparse_exactness.py); the states drift apart by the same rounding over many
steps, and rel stays at that level. In bfloat16 (8 bits of mantissa) each rounding is ~4e-3 and
the activations are rounded where the two paths round them differently, so rel ~1e-2; then
near-ties (margins below ~1e-2 of the logit norm) flip. Anything well above those levels is a
bug, not rounding.

Writes OUT/sparse_exactness.json (every step), .md (one row per case) and .png (rel against
step, one line per case, with the two levels). On the CPU the sparse step runs its PyTorch
reference kernels by default (``--backend triton`` under TRITON_INTERPRET=1 runs the Triton
kernels in float32); bfloat16 runs on the PyTorch kernels only there.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import train as tr
from .bench_bdh import check_checkpoint
from .bench_sparse import make_prompts
from .harness import (Choice, Device, InFile, Int, Ints, Names, Optional, OutDir, Stopwatch,
                      default_out, free_memory, markdown_table, option, parse_config, run_meta,
                      save_figure, threads_field, torch_threads, write_json, write_text)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# rel expected from summation order alone, per dtype (the docstring's bound)
LEVELS = {"float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}


@dataclass
class ExactnessConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu, cuda or cuda:i"))
    threads: int | None = threads_field()
    checkpoint: str | None = field(default=None, metadata=option(
        Optional(InFile()), "also a trained BDH (a checkpoint of `python -m experiments.train "
                            "--model bdh`), read on validation text",
        shown="none: random weights only"))
    bdh: dict = field(default_factory=dict, metadata=option(
        tr.BDH_OVERRIDES, "BDHConfig of the random-weight model",
        shown="experiments.train's preset of the same name"))
    dtypes: tuple = field(default=("float32",), metadata=option(
        Names(tuple(DTYPES)), "comma list of the model dtypes to compare in"))
    backend: str = field(default="auto", metadata=option(
        Choice(("auto", "triton", "torch")), "the sparse step's kernels (auto: Triton on CUDA, "
                                             "the PyTorch reference on the CPU)"))
    contexts: tuple = field(default=(64, 512), metadata=option(
        Ints(1), "prompt lengths: every one at batch 1, the first at every --batches"))
    batches: tuple = field(default=(1, 4), metadata=option(
        Ints(1), "batch sizes at the first context"))
    steps: int = field(default=32, metadata=option(Int(1), "teacher-forced steps per case"))
    forcing: str = field(default="auto", metadata=option(
        Choice(("auto", "text", "greedy")), "the tokens fed to both paths: the next bytes of "
                                            "validation text, or the dense path's greedy "
                                            "choice (auto: text for trained weights, greedy "
                                            "for random ones)"))
    seed: int = field(default=0, metadata=option(Int(0), "random weights and prompts"))
    out: str = field(default=default_out("sparse_exactness"), metadata=option(
        OutDir(), "output folder"))

    def check(self) -> None:
        if self.checkpoint is not None:
            check_checkpoint(self.checkpoint)
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if self.backend == "triton" and self.device == "cpu":
            if not interpret:
                raise ValueError("--backend: triton on the CPU needs TRITON_INTERPRET=1 set in "
                                 "the environment, got it unset")
            if "bfloat16" in self.dtypes:
                raise ValueError(f"--dtypes: the Triton interpreter mis-loads bfloat16, got "
                                 f"{','.join(self.dtypes)} with --backend triton on the CPU")
        if self.forcing == "text" and self.checkpoint is None:
            raise ValueError("--forcing: text is for a trained model (--checkpoint); random "
                             "weights read random bytes, so they are forced greedily")


PRESETS = {
    "cpu": dict(threads=1, bdh=tr.PRESETS["cpu"]["bdh"], dtypes=("float32", "bfloat16")),
    # The sparse benchmark's cases (experiments.bench_sparse): batch 1 after 1k and 100k,
    # batch 4 and 64 after 1k; the official BDH; both dtypes.
    "h100": dict(device="cuda", bdh=tr.PRESETS["h100"]["bdh"], dtypes=("float32", "bfloat16"),
                 contexts=(1024, 100_000), batches=(1, 4, 64), steps=256),
}


def config_from_args(argv=None) -> ExactnessConfig:
    return parse_config(ExactnessConfig, PRESETS, argv,
                        prog="python -m experiments.sparse_exactness",
                        description=__doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------- the comparison

def logit_stats(sparse: torch.Tensor, dense: torch.Tensor) -> dict:
    """Per row of [B, vocab] logits: rel = ‖sparse − dense‖ / ‖dense‖, whether the top-1 token
    differs, and the dense top-2 margin, absolute and over ‖dense‖ (float64 lists)."""
    s, d = sparse.double(), dense.double()
    norm = d.norm(dim=-1)
    top2 = d.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    return {"rel": ((s - d).norm(dim=-1) / norm).tolist(),
            "flip": (s.argmax(-1) != d.argmax(-1)).tolist(),
            "margin": margin.tolist(), "rel_margin": (margin / norm).tolist()}


@torch.no_grad()
def teacher_forced(model, state, first: torch.Tensor, steps: int, *, forced=None,
                   backend: str = "auto") -> list[dict]:
    """Dense and sparse decoding of ``model`` from copies of ``state`` (a BDHState, not
    changed), both fed ``first`` [B] at step 0 and then, at step i, ``forced[:, i - 1]`` (a
    [B, steps - 1] tensor) or, without it, the dense path's argmax. Returns one
    `logit_stats` dict per step."""
    from bdh.decode import BDHDecoder
    B = first.shape[0]
    dense_mode = "graph" if first.device.type == "cuda" else "eager"
    dense = BDHDecoder(model, B, dense_mode, state=state.clone())
    sparse = BDHDecoder(model, B, "sparse", backend=backend, state=state.clone())
    tok, out = first, []
    for i in range(steps):
        ld = dense.step(tok).clone()
        ls = sparse.step(tok)
        out.append(logit_stats(ls, ld))
        if i + 1 < steps:
            tok = ld.argmax(-1) if forced is None else forced[:, i]
    return out


def summarise(per_step: list[dict]) -> dict:
    """The case's numbers: rel (max, mean, last step's max), top-1 flips with their margins."""
    rel = [r for s in per_step for r in s["rel"]]
    flips = [{"step": i, "row": b, "rel": s["rel"][b], "margin": s["margin"][b],
              "rel_margin": s["rel_margin"][b]}
             for i, s in enumerate(per_step) for b, f in enumerate(s["flip"]) if f]
    margins = sorted(m for s in per_step for m in s["rel_margin"])
    return {"max_rel": max(rel), "mean_rel": sum(rel) / len(rel),
            "last_max_rel": max(per_step[-1]["rel"]),
            "top1_differs": len(flips) / len(rel), "flips": flips,
            "median_rel_margin": margins[len(margins) // 2],
            "max_flip_rel_margin": max((f["rel_margin"] for f in flips), default=None),
            "max_flip_margin": max((f["margin"] for f in flips), default=None)}


def model_sets(cfg: ExactnessConfig, dtype: torch.dtype):
    """(label, model factory, validation text or None) per weight set."""
    from bdh import BDH, BDHConfig, load_trained_bdh

    def random_model():
        torch.manual_seed(cfg.seed)
        return BDH(BDHConfig(**{**cfg.bdh, "dropout": 0.0})).to(cfg.device, dtype).eval()

    sets = [("random", random_model, None)]
    if cfg.checkpoint:
        from .data import load_corpus

        def trained():
            return load_trained_bdh(cfg.checkpoint, cfg.device, dtype)[0]
        sets.insert(0, ("trained", trained, load_corpus("shakespeare")["val"]))
    return sets


def run_case(model, text, cfg: ExactnessConfig, P: int, B: int) -> dict:
    """Prefill P tokens in B rows, then ``cfg.steps`` teacher-forced steps."""
    from bdh.decode import BDHDecoder
    forcing = cfg.forcing if cfg.forcing != "auto" else ("text" if text else "greedy")
    ids = make_prompts(B, P + cfg.steps, cfg.device, text, seed=cfg.seed)
    with Stopwatch(cfg.device) as sw:
        pre = BDHDecoder(model, B, "eager")
        pre.prefill(ids[:, :P - 1])
        state = pre.state
        per_step = teacher_forced(model, state, ids[:, P - 1], cfg.steps,
                                  forced=ids[:, P:] if forcing == "text" else None,
                                  backend=cfg.backend)
    del pre, state
    return {"batch": B, "context": P, "forcing": forcing, "seconds": sw.seconds,
            **summarise(per_step), "per_step": per_step}


def cases(cfg: ExactnessConfig) -> list[tuple[int, int]]:
    """(context, batch): batch 1 at every context, every batch at the first context."""
    return [(P, 1) for P in cfg.contexts] + [(cfg.contexts[0], B) for B in cfg.batches
                                             if B != 1]


# ----------------------------------------------------------------------------- outputs

def table_rows(result: dict) -> list[dict]:
    rows = []
    for c in result["cases"]:
        rows.append({"weights": c["weights"], "dtype": c["dtype"], "batch": c["batch"],
                     "context": c["context"], "forcing": c["forcing"],
                     "steps": len(c["per_step"]),
                     "max rel": c["max_rel"], "mean rel": c["mean_rel"],
                     "level": LEVELS[c["dtype"]],
                     "top-1 differs": f"{100 * c['top1_differs']:.1f}%",
                     "largest margin at a flip": c["max_flip_rel_margin"],
                     "(in logits)": c.get("max_flip_margin"),
                     "median margin": c["median_rel_margin"]})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.6))
    # one colour per (weights, batch, context), one line style per dtype
    keys = list(dict.fromkeys((c["weights"], c["batch"], c["context"]) for c in result["cases"]))
    styles = dict(zip(DTYPES, ("-", "--", ":")))
    for c in result["cases"]:
        y = [max(s["rel"]) for s in c["per_step"]]
        key = (c["weights"], c["batch"], c["context"])
        ax.plot(range(len(y)), y, styles[c["dtype"]], lw=1.2, color=f"C{keys.index(key) % 10}",
                label=f"{c['weights']} {c['dtype']} B{c['batch']} ctx {c['context']}")
    for name in sorted({c["dtype"] for c in result["cases"]}):
        ax.axhline(LEVELS[name], color="grey", ls=":", lw=1)
        ax.text(0, LEVELS[name] * 1.15, f"{name} rounding level", fontsize=7, color="grey")
    ax.set_yscale("log")
    ax.set(xlabel="teacher-forced step", ylabel="max over rows of ‖sparse − dense‖ / ‖dense‖",
           title="sparse vs dense decoding, same tokens fed to both")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    meta = result["meta"]
    fig.suptitle(f"{meta['device']}, commit {meta['commit']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    write_json(out / "sparse_exactness.json", result)
    meta = result["meta"]
    text = "\n\n".join([
        "# Sparse against dense decoding, teacher-forced",
        f"{meta['date']} · {meta['device']} · commit {meta['commit']} · preset "
        f"{result['config']['preset']} · sparse backend {result['config']['backend']}",
        "rel = ‖l_sparse − l_dense‖ / ‖l_dense‖ per step and row; margins are the dense "
        "top-2 gap over ‖l_dense‖ (a flip needs a margin ≤ √2·rel), and in logits (in bf16 "
        "a gap of 0 is a tie and 1/32 one unit in the last place at logits of 4 to 8).",
        markdown_table(table_rows(result))])
    write_text(out / "sparse_exactness.md", text + "\n")
    plot(result, out / "sparse_exactness.png")


def main(argv=None) -> dict:
    cfg = config_from_args(argv)
    out = Path(cfg.out)
    result = {"meta": run_meta(cfg.device), "config": dataclasses.asdict(cfg), "cases": []}
    if cfg.checkpoint:
        from bdh.checkpoint import read_bdh_checkpoint
        saved = read_bdh_checkpoint(cfg.checkpoint)
        result["meta"]["checkpoint"] = {"path": cfg.checkpoint, "step": saved.get("step")}
        del saved
    with torch_threads(cfg.threads):
        for name in cfg.dtypes:
            for weights, make, text in model_sets(cfg, DTYPES[name]):
                model = make()
                for P, B in cases(cfg):
                    case = run_case(model, text, cfg, P, B)
                    result["cases"].append({"weights": weights, "dtype": name, **case})
                    print(f"{weights} {name} B{B} ctx {P}: max rel {case['max_rel']:.2e}, "
                          f"top-1 differs {100 * case['top1_differs']:.1f}%")
                    write_outputs(result, out)
                model = None
                free_memory(cfg.device)
    print(markdown_table(table_rows(result)))
    print(f"results: {out}/sparse_exactness.json, .md, .png")
    return result


if __name__ == "__main__":
    main()

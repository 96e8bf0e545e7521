"""Why does GPT-2 decode slowly in the plain transformers loop, and how fast does it decode when
done with care? Times one-token decode steps of the same GPT-2 several ways, in one process:

    dynamic/sdpa      the plain HF loop (DynamicCache grows by concatenation; default SDPA
                      backend selection) — what `memory_wall` measured before
    dynamic/sdpa#2    the same loop again on a second, identical model (is the cost paid once
                      per new KV length, or every step?)
    dynamic/no-cudnn  the plain loop with cuDNN's SDPA backend switched off
    dynamic/eager     the plain loop with eager attention
    static/efficient  `baselines.gpt2_decode`: StaticCache (fixed shapes), memory-efficient SDPA
    static/compiled   the same step under torch.compile(mode="reduce-overhead") (CUDA graphs)

and records a torch.profiler table (self CUDA and CPU time per op) of the plain loop's first
steps, which names the cost. Writes JSON, a Markdown table and a bar chart.

    python -m experiments.gpt2_decode                       # CPU: a tiny GPT-2, about 10 s
    python -m experiments.gpt2_decode --preset h100         # GPT-2 124M shape, 1k and 16k context
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from baselines import GPT2LM, gpt2_config
from baselines.gpt2_decode import GPT2StaticDecoder, make_static_cache

from .harness import (DECODE_POLICY, Int, Ints, Optional, OutDir, default_out, markdown_table,
                      option, parse_config, run_meta, save_figure, sync, time_call,
                      torch_threads, write_json, write_text)

VARIANTS = ("dynamic/sdpa", "dynamic/sdpa#2", "dynamic/no-cudnn", "dynamic/eager",
            "static/efficient", "static/compiled")


@dataclass
class DecodeConfig:
    preset: str = "cpu"
    device: str = "cpu"
    threads: int | None = None
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    dtype: str = "bfloat16"
    contexts: tuple = field(default=(64, 256), metadata=option(
        Ints(1), "comma list of prompt lengths"))
    steps: int | None = field(default=None, metadata=option(
        Optional(Int(1)), "at least this many decode steps timed one by one per variant",
        shown=f"the harness's {DECODE_POLICY.min_reps}"))
    profile_steps: int = 4
    variants: tuple = ()
    out: str = field(default=default_out("gpt2_decode"), metadata=option(
        OutDir(), "output folder"))
    seed: int = 0

    def check(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--preset: h100 needs a CUDA GPU")

    def policy(self):
        """Decode steps timed one by one; static/compiled records its CUDA graphs in the
        three warm-up steps."""
        return dataclasses.replace(DECODE_POLICY.with_min_reps(self.steps),
                                   warmup=max(3, DECODE_POLICY.warmup))


PRESETS = {
    "cpu": dict(device="cpu", threads=1, n_layer=2, n_embd=64, n_head=2, contexts=(64, 256),
                variants=("dynamic/sdpa", "dynamic/sdpa#2", "dynamic/eager",
                          "static/efficient"), profile_steps=4),
    "h100": dict(device="cuda", n_layer=12, n_embd=768, n_head=12, contexts=(1024, 16384),
                 steps=32, profile_steps=8, variants=VARIANTS),
}


def build(cfg: DecodeConfig, attn: str, n_positions: int) -> GPT2LM:
    torch.manual_seed(cfg.seed)
    gcfg = gpt2_config(cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=n_positions,
                       dropout=0.0, attn_implementation=attn)
    dt = getattr(torch, cfg.dtype) if cfg.device == "cuda" else torch.float32
    return GPT2LM(gcfg).to(cfg.device, dt).eval()


def time_dynamic(model: GPT2LM, prompt, dev, policy, sdpa_ctx=contextlib.nullcontext):
    """Median ms per token of the plain loop (GPT2LM's streaming state = HF DynamicCache)."""
    with torch.no_grad(), sdpa_ctx():
        logits, st = model(prompt, return_state=True)
        loop = {"state": st, "next": logits[:, -1:].argmax(-1)}

        def step():
            logits, loop["state"] = model(loop["next"], state=loop["state"], return_state=True)
            loop["next"] = logits[:, -1:].argmax(-1)
        return time_call(step, dev, policy=policy).median_ms


def time_static(model: GPT2LM, prompt, dev, compiled: bool, policy):
    """Median ms per token through a StaticCache (fixed shapes), sized for the policy's
    calls."""
    dec = GPT2StaticDecoder(model.hf, "auto", compile_step=compiled)
    P = prompt.shape[1]
    cache = make_static_cache(model.hf, prompt.shape[0], P + policy.warmup + policy.max_reps + 1)
    from baselines.gpt2_decode import sdpa_context
    with torch.no_grad(), sdpa_context("auto", dev):
        logits = dec._call(dec.hf, prompt, cache, 0)
        loop = {"next": logits[:, -1:].argmax(-1), "position": P}

        def step():
            loop["next"] = dec._call(dec._step, loop["next"], cache,
                                     loop["position"])[:, -1:].argmax(-1)
            loop["position"] += 1
        return time_call(step, dev, policy=policy).median_ms


def no_cudnn():
    """SDPA with cuDNN's backend off (flash / efficient / math remain)."""
    @contextlib.contextmanager
    def ctx():
        before = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            yield
        finally:
            torch.backends.cuda.enable_cudnn_sdp(before)
    return ctx


def profile_plain(model: GPT2LM, prompt, steps: int, dev, top: int = 12) -> list[dict]:
    """The plain loop's first ``steps`` decode steps under torch.profiler: the ops with the
    most self time (CUDA on a GPU, else CPU)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.no_grad():
        logits, st = model(prompt, return_state=True)
        nxt = logits[:, -1:].argmax(-1)
        sync(dev)
        with profile(activities=acts) as prof:
            for _ in range(steps):
                logits, st = model(nxt, state=st, return_state=True)
                nxt = logits[:, -1:].argmax(-1)
            sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))[:top]:
        rows.append({"op": ev.key[:60], "calls": ev.count,
                     "self device ms/step": getattr(ev, "self_device_time_total", 0) / 1e3 / steps,
                     "self cpu ms/step": ev.self_cpu_time_total / 1e3 / steps})
    return rows


def run(cfg: DecodeConfig) -> dict:
    with torch_threads(cfg.threads):
        return _run(cfg)


def _run(cfg: DecodeConfig) -> dict:
    dev, policy = torch.device(cfg.device), cfg.policy()
    rows, profile = [], None
    n_pos = max(cfg.contexts) + policy.warmup + policy.max_reps + 1
    models = {"sdpa": build(cfg, "sdpa", n_pos)}
    if any(v.endswith("#2") for v in cfg.variants):
        models["sdpa#2"] = copy.deepcopy(models["sdpa"])
    if "dynamic/eager" in cfg.variants:
        models["eager"] = build(cfg, "eager", n_pos)
    for P in cfg.contexts:
        prompt = torch.randint(0, 256, (1, P), device=dev)
        for var in cfg.variants:
            kind, how = var.split("/")
            try:
                if kind == "dynamic":
                    m = models["eager" if how == "eager" else
                               ("sdpa#2" if how.endswith("#2") else "sdpa")]
                    ctx = no_cudnn() if how == "no-cudnn" else contextlib.nullcontext
                    ms = time_dynamic(m, prompt, dev, policy, ctx)
                else:
                    ms = time_static(models["sdpa"], prompt, dev, how == "compiled", policy)
                note = ""
            except Exception as exc:                               # noqa: BLE001
                ms, note = None, f"{type(exc).__name__}: {str(exc)[:120]}"
            rows.append({"context": P, "variant": var, "ms/token": ms,
                         "tok/s": None if not ms else 1e3 / ms, "note": note})
            print(rows[-1], flush=True)
        if profile is None:
            # A fresh model: the plain loop's first steps at a new KV length, as a user sees.
            profile = profile_plain(build(cfg, "sdpa", n_pos), prompt, cfg.profile_steps, dev)
    return {"meta": run_meta(dev, config=asdict(cfg), timing=dataclasses.asdict(policy)),
            "rows": rows, "profile": profile}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["ms/token"]]
    contexts = sorted({r["context"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / max(1, len(contexts))
    for i, P in enumerate(contexts):
        ys = [next((r["ms/token"] for r in rows if r["context"] == P and r["variant"] == v),
                   0) for v in variants]
        ax.bar([j + i * w for j in range(len(variants))], ys, w, label=f"{P} tokens of context")
    ax.set_xticks([j + w * (len(contexts) - 1) / 2 for j in range(len(variants))], variants,
                  rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("ms per decoded token")
    m = result["meta"]
    ax.set_title(f"GPT-2 decode, {m.get('device')}, "
                 f"commit {m.get('commit') or 'unknown'}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def parse(argv=None) -> DecodeConfig:
    return parse_config(DecodeConfig, PRESETS, argv, prog="python -m experiments.gpt2_decode",
                        description=__doc__.split("\n")[0])


def main(argv=None) -> dict:
    cfg = parse(argv)
    result = run(cfg)
    out = Path(cfg.out)
    write_json(out / "gpt2_decode.json", result)
    md = markdown_table(result["rows"]) + "\n\nProfile of the plain loop's first steps:\n\n" + \
        markdown_table(result["profile"]) + "\n"
    write_text(out / "gpt2_decode.md", md)
    plot(result, out / "gpt2_decode.png")
    print(md)
    return result


if __name__ == "__main__":
    main()

"""The memory wall: GPT-2's memory grows with the context, BDH's does not.

    python -m experiments.memory_wall [--device cpu|cuda] [--max-tokens N] [--models bdh,gpt2]
                                      [--out DIR] [--preset cpu|h100]

For each model, at contexts L = 1024, 2048, … up to --max-tokens (or the first out-of-memory):

* decode:  peak memory and ms per token while generating after a context of L tokens. GPT-2
           decodes through transformers' KV cache, BDH through its fixed-size state. One stream
           per model grows through all the L: before each point it is fed exactly the tokens that
           bring its context to L, then it decodes --decode-steps greedy tokens. The peak is the
           decode phase's own (reset after the context is in): it holds the KV cache / the state.
* prefill: peak memory and time to consume L tokens from an empty history. GPT-2 ("gpt2-sdpa"
           and "gpt2-eager") takes them in one forward call (use_cache=False, as a user scoring
           a document would); BDH streams them through its chunked kernel in --bdh-chunk pieces.

Out-of-memory is recorded as a point with "oom": true and ends that model/mode's sweep; a
per-model/mode time budget (--time-budget-s) also ends a sweep whose next point would not fit
(recorded in meta.stopped). GPT-2 is built with n_positions ≥ the largest context: its learned
position table (n_positions × n_embd) is part of its memory and parameter count.

Memory: on CUDA, torch.cuda.max_memory_allocated (reset per point); on the CPU, the peak
resident set size of a fresh process per model/mode (sampled every ms): process-wide, so it
includes Python and torch themselves. Outputs DIR/memory_wall.json, .png and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .measure import PeakMemory, free_memory, is_oom
from .results import markdown_table, run_meta, write_json

GPT2_ATTN = {"gpt2-sdpa": "sdpa", "gpt2-eager": "eager"}


@dataclass
class WallConfig:
    device: str = "cpu"
    max_tokens: int = 8192
    models: tuple[str, ...] = ("bdh", "gpt2")
    out: str = "results/memory_wall"
    preset: str = "cpu"
    dtype: str = "float32"
    decode_steps: int = 8
    bdh_chunk: int = 2048
    time_budget_s: float = 60.0
    bdh: dict = field(default_factory=dict)
    gpt2: dict = field(default_factory=dict)


PRESETS = {
    # Tiny models: the whole sweep (1k → 8k) runs in about a minute on a laptop CPU.
    "cpu": dict(max_tokens=8192, dtype="float32", decode_steps=8, bdh_chunk=2048,
                time_budget_s=30.0,
                bdh=dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16,
                         dropout=0.0),
                gpt2=dict(n_layer=2, n_embd=64, n_head=2)),
    # The real sizes: the official 25M BDH against the GPT-2 124M shape (byte vocabulary).
    "h100": dict(max_tokens=1 << 20, dtype="bfloat16", decode_steps=16, bdh_chunk=16384,
                 time_budget_s=100.0,
                 bdh=dict(dropout=0.0),
                 gpt2=dict(n_layer=12, n_embd=768, n_head=12)),
}


def contexts(max_tokens: int) -> list[int]:
    out, L = [], 1024
    while L <= max_tokens:
        out.append(L)
        L *= 2
    return out


# ----------------------------------------------------------------------------- models

def build(model_name: str, cfg: WallConfig):
    """The model for a sweep name ('bdh', 'gpt2-sdpa', 'gpt2-eager'), on cfg.device."""
    dtype = getattr(torch, cfg.dtype)
    if model_name == "bdh":
        from bdh import BDH, BDHConfig
        model = BDH(BDHConfig(**cfg.bdh))
    else:
        from baselines import GPT2LM, gpt2_config
        g = cfg.gpt2
        model = GPT2LM(gpt2_config(g["n_layer"], g["n_embd"], g["n_head"], vocab_size=256,
                                   n_positions=cfg.max_tokens + cfg.decode_steps + 1,
                                   dropout=0.0, attn_implementation=GPT2_ATTN[model_name]))
    return model.to(cfg.device, dtype).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _feed(model, name, tokens, state, chunk):
    """Consume ``tokens`` [1,n] into the stream ``state``; returns (last logits, state)."""
    logits = None
    step = chunk if name == "bdh" else 4096
    for s in range(0, tokens.shape[1], step):
        logits, state = model(tokens[:, s:s + step], state=state, return_state=True)
    return logits, state


# ----------------------------------------------------------------------------- sweeps

def decode(model, name, nxt, state, steps, device):
    """Greedy-decode ``steps`` tokens after ``nxt`` from ``state``. BDH uses its `generate`
    (the fixed state updated in place by `hebbian_step`); GPT-2 steps its KV cache. Returns
    (ms per token, meter) with meter.state / meter.next_token set to continue the stream."""
    with PeakMemory(device) as m:
        if name == "bdh":
            out, state = model.generate(nxt, steps, top_k=1, state=state, return_state=True)
            nxt = out[:, -1:]           # the state has consumed all returned tokens but this one
        else:
            for _ in range(steps):
                logits, state = model(nxt, state=state, return_state=True)
                nxt = logits[:, -1:].argmax(-1)
    return 1e3 * m.seconds / steps, m.peak, m.seconds, state, nxt


def warm_up(model, name, mode, cfg, device) -> None:
    """Compile/autotune every kernel the sweep will use (dense and chunked prefill, the decode
    step), so that no point's time includes it; memory is freed before the sweep starts."""
    with torch.no_grad():
        for T in sorted({min(1024, cfg.max_tokens), min(2048, cfg.max_tokens)}):
            idx = torch.randint(0, 256, (1, T), device=device)
            if name == "bdh" or mode == "decode":
                logits, st = _feed(model, name, idx, None, cfg.bdh_chunk)
                if mode == "decode":
                    decode(model, name, logits[:, -1:].argmax(-1), st, 2, device)
            else:
                model(idx)
    free_memory(device)


def _point(name, mode, L, peak=None, state_bytes=None, ms=None, oom=False):
    return {"model": name, "mode": mode, "context": L, "peak_bytes": peak,
            "state_bytes": state_bytes, "ms_per_token": ms, "oom": oom}


def sweep(name: str, mode: str, cfg: WallConfig, emit) -> str | None:
    """Run one model/mode over the contexts, calling emit(point) per point. Returns why it
    stopped early (or None)."""
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(0)
    model = build(name, cfg)
    try:
        warm_up(model, name, mode, cfg, device)
    except Exception as exc:                                        # noqa: BLE001
        if not is_oom(exc):                 # an OOM here is met again, and recorded, below
            raise
        free_memory(device)
    spent, state, consumed, nxt = 0.0, None, 0, None
    for L in contexts(cfg.max_tokens):
        try:
            with torch.no_grad():
                if mode == "prefill":
                    idx = torch.randint(0, 256, (1, L), generator=gen).to(device)
                    with PeakMemory(device) as m:
                        if name == "bdh":
                            _, st = _feed(model, name, idx, None, cfg.bdh_chunk)
                            sb = st.nbytes()
                        else:
                            model(idx)
                            sb = None
                    emit(_point(name, mode, L, m.peak, sb, 1e3 * m.seconds / L))
                    secs = m.seconds
                    del idx
                else:
                    fill = torch.randint(0, 256, (1, L - consumed), generator=gen).to(device)
                    with PeakMemory(device) as pre:
                        logits, state = _feed(model, name, fill, state, cfg.bdh_chunk)
                    consumed, sb = L, state.nbytes()          # the state at context L
                    nxt = logits[:, -1:].argmax(-1)
                    del fill, logits                  # only the state may be resident now
                    ms, peak, dsecs, state, nxt = decode(model, name, nxt, state,
                                                         cfg.decode_steps, device)
                    consumed += cfg.decode_steps
                    emit(_point(name, mode, L, peak, sb, ms))
                    secs = pre.seconds + dsecs
        except Exception as exc:                                    # noqa: BLE001
            if not is_oom(exc):
                raise
            state = None
            free_memory(device)
            emit(_point(name, mode, L, oom=True))
            return f"out of memory at {L} tokens"
        spent += secs
        growth = 4.0 if name.startswith("gpt2") else 2.0          # attention is O(L²)
        if spent + growth * secs > cfg.time_budget_s and L * 2 <= cfg.max_tokens:
            return (f"time budget {cfg.time_budget_s:.0f}s: stopped after {L} tokens "
                    f"(the next point would take ~{growth * secs:.0f}s more)")
    return None


def jobs(cfg: WallConfig) -> list[tuple[str, str]]:
    out = []
    for m in cfg.models:
        if m == "bdh":
            out += [("bdh", "decode"), ("bdh", "prefill")]
        elif m == "gpt2":
            out += [("gpt2-sdpa", "decode"), ("gpt2-sdpa", "prefill"), ("gpt2-eager", "prefill")]
        elif m in GPT2_ATTN:
            out += [(m, "decode"), (m, "prefill")]
        else:
            raise ValueError(f"--models: unknown model {m!r}; expected bdh, gpt2, gpt2-sdpa "
                             f"or gpt2-eager")
    return out


def _run_job_in_subprocess(cfg: WallConfig, name: str, mode: str, emit) -> str | None:
    """CPU: one fresh process per model/mode, so its RSS peak is its own."""
    cmd = [sys.executable, "-m", "experiments.memory_wall", "--_worker",
           json.dumps({"cfg": asdict(cfg), "name": name, "mode": mode})]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stopped = None
    for line in proc.stdout:
        msg = json.loads(line)
        if "point" in msg:
            emit(msg["point"])
        else:
            stopped = msg.get("stopped")
    if proc.wait() != 0:
        raise RuntimeError(f"memory_wall worker for {name}/{mode} failed "
                           f"(exit {proc.returncode})")
    return stopped


# ----------------------------------------------------------------------------- output

def plot(points: list[dict], path: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = sorted({(p["model"], p["mode"]) for p in points})
    for model, mode in series:
        pts = [p for p in points if p["model"] == model and p["mode"] == mode]
        ok = [p for p in pts if not p["oom"]]
        style = "-" if mode == "decode" else "--"
        label = f"{model} {mode}"
        line, = ax_m.plot([p["context"] for p in ok], [p["peak_bytes"] / 2**30 for p in ok],
                          style, marker="o", label=label)
        ax_t.plot([p["context"] for p in ok], [p["ms_per_token"] for p in ok], style,
                  marker="o", color=line.get_color(), label=label)
        for p in pts:
            if p["oom"]:
                top = max([q["peak_bytes"] for q in ok] or [0]) / 2**30
                ax_m.plot(p["context"], top, "x", color="red", markersize=12, mew=3)
                ax_m.annotate("OOM", (p["context"], top), color="red",
                              textcoords="offset points", xytext=(4, 4))
    for ax in (ax_m, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    ax_m.set_ylabel("peak memory (GiB)")
    ax_m.set_title("memory against context (x: out of memory)")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("ms per token")
    ax_t.set_title("time per token")
    ax_t.legend(fontsize=8)
    fig.suptitle(f"memory wall on {meta['device']} ({meta['dtype']}); "
                 f"BDH {meta['params']['bdh'] / 1e6:.1f}M params"
                 + (f", GPT-2 {meta['params']['gpt2'] / 1e6:.1f}M" if "gpt2" in meta['params']
                    else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(points: list[dict]) -> str:
    rows = [{"model": p["model"], "mode": p["mode"], "context": p["context"],
             "peak MiB": None if p["peak_bytes"] is None else p["peak_bytes"] / 2**20,
             "state MiB": None if p["state_bytes"] is None else p["state_bytes"] / 2**20,
             "ms/token": p["ms_per_token"], "oom": "OOM" if p["oom"] else ""}
            for p in points]
    return markdown_table(rows)


# ----------------------------------------------------------------------------- CLI

def parse(argv=None) -> WallConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda with --preset h100, else cpu")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest context (default: 8192 on the cpu preset, 1048576 on h100)")
    p.add_argument("--models", default="bdh,gpt2",
                   help="comma list of bdh, gpt2 (= gpt2-sdpa + gpt2-eager), gpt2-sdpa, "
                        "gpt2-eager")
    p.add_argument("--out", default="results/memory_wall")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--decode-steps", type=int, default=None)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="per model/mode: stop growing the context when the next point would "
                        "exceed it")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        return a._worker
    preset = PRESETS[a.preset]
    cfg = WallConfig(preset=a.preset, out=a.out,
                     device=a.device or ("cuda" if a.preset == "h100" else "cpu"),
                     models=tuple(m.strip() for m in a.models.split(",") if m.strip()),
                     **{k: v for k, v in preset.items()})
    for flag in ("max_tokens", "decode_steps", "time_budget_s"):
        if getattr(a, flag) is not None:
            setattr(cfg, flag, getattr(a, flag))
    if cfg.max_tokens < 1024:
        raise SystemExit(f"--max-tokens must be >= 1024 (the first context), got {cfg.max_tokens}")
    if cfg.decode_steps < 1:
        raise SystemExit(f"--decode-steps must be >= 1, got {cfg.decode_steps}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    jobs(cfg)                                                     # validate --models early
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    if isinstance(cfg, str):                                      # a CPU worker process
        spec = json.loads(cfg)
        wc = WallConfig(**{**spec["cfg"], "models": tuple(spec["cfg"]["models"])})
        why = sweep(spec["name"], spec["mode"], wc,
                    lambda p: print(json.dumps({"point": p}), flush=True))
        print(json.dumps({"stopped": why}), flush=True)
        return {}

    out = Path(cfg.out)
    params = {}
    if "bdh" in cfg.models:
        params["bdh"] = n_params(build("bdh", WallConfig(**{**asdict(cfg), "device": "cpu",
                                                            "dtype": "float32"})))
    if any(m.startswith("gpt2") for m in cfg.models):
        params["gpt2"] = n_params(build("gpt2-sdpa", WallConfig(**{**asdict(cfg),
                                                                  "device": "cpu",
                                                                  "dtype": "float32"})))
        g = cfg.gpt2
        params["gpt2_position_table"] = (cfg.max_tokens + cfg.decode_steps + 1) * g["n_embd"]
    meta = run_meta(cfg.device, dtype=cfg.dtype, preset=cfg.preset, config=asdict(cfg),
                    params=params, stopped={},
                    memory=("torch.cuda.max_memory_allocated per point" if cfg.device == "cuda"
                            else "peak RSS of a fresh process per model/mode, sampled every ms"),
                    notes=["decode peak: the decode phase only, with the context's KV cache or "
                           "state resident", "GPT-2 prefill: one forward, use_cache=False",
                           "GPT-2 uses a byte vocabulary (256) and n_positions = max context + "
                           "decode steps + 1: its position table is counted in its parameters",
                           f"BDH prefill streams in chunks of {cfg.bdh_chunk} tokens"])
    points: list[dict] = []
    todo = jobs(cfg)
    bar = tqdm(total=len(todo) * len(contexts(cfg.max_tokens)), desc="memory wall",
               unit="point")

    def emit(p):
        points.append(p)
        bar.update(1)
        bar.set_postfix_str(f"{p['model']} {p['mode']} {p['context']}")
        write_json(out / "memory_wall.json", {"meta": meta, "points": points})

    for name, mode in todo:
        if cfg.device == "cpu":
            why = _run_job_in_subprocess(cfg, name, mode, emit)
        else:
            why = sweep(name, mode, cfg, emit)
            free_memory(cfg.device)
        if why:
            meta["stopped"][f"{name}/{mode}"] = why
    bar.close()
    result = {"meta": meta, "points": points}
    write_json(out / "memory_wall.json", result)
    md = table(points)
    (out / "memory_wall.md").write_text(md + "\n")
    try:
        plot(points, out / "memory_wall.png", meta)
    except Exception as exc:                                      # noqa: BLE001
        print(f"plotting failed ({type(exc).__name__}: {exc}); the JSON is complete")
    print(md)
    for k, v in meta["stopped"].items():
        print(f"{k}: {v}")
    print(f"wrote {out}/memory_wall.json, .png, .md")
    return result


if __name__ == "__main__":
    main()

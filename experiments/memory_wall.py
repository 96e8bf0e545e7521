"""The memory wall: GPT-2's memory grows with the context, BDH's does not.

    python -m experiments.memory_wall [--device cpu|cuda] [--max-tokens N] [--models bdh,gpt2]
                                      [--out DIR] [--preset cpu|h100]

For each model, at contexts L = 1024, 2048, … up to --max-tokens (or the first out-of-memory):

* decode:  peak memory and ms per token while generating after a context of L tokens. GPT-2
           decodes through transformers' KV cache, BDH through its fixed-size state. One stream
           per model grows through all the L: before each point it is fed exactly the tokens that
           bring its context to L, then it decodes --decode-steps greedy tokens. The peak is the
           decode phase's own (reset after the context is in): it holds the KV cache / the state.
           Each model decodes the way a user who cares would: BDH on CUDA replays a captured
           CUDA graph of its step; "gpt2-sdpa" is the plain transformers loop (DynamicCache, as
           most users run it); "gpt2-static" is the tuned GPT-2 (a StaticCache of fixed shapes
           under the memory-efficient SDPA kernel, `baselines.gpt2_decode`; a new cache per
           context, since a static cache's length is fixed).
* prefill: peak memory and time to consume L tokens from an empty history. GPT-2 ("gpt2-sdpa"
           and "gpt2-eager") takes them in one forward call (use_cache=False, as a user scoring
           a document would); BDH streams them through its chunked kernel in --bdh-chunk pieces.

Out-of-memory (torch.cuda.OutOfMemoryError; on the CPU a MemoryError or a peak RSS above
--rss-budget-gb) is recorded as a point with "oom": true and ends that model/mode's sweep. A
per-model/mode time budget (--time-budget-s, shrunk so that all sweeps fit in --deadline-s) also
ends a sweep whose next point would not fit (recorded in meta.stopped). GPT-2 is built with
n_positions ≥ the largest context: its learned position table (n_positions × n_embd) is part of
its memory and parameter count (meta.params gives both). "gpt2-25m" is GPT-2 (sdpa) matched to
BDH's parameter count without the position table (6 blocks, width a multiple of 64).

Memory: on CUDA, torch.cuda.max_memory_allocated (reset per point; for decode, reset after the
context is consumed, so it is the decode phase's peak; the peak while consuming the context is
in meta.context_peak_bytes); on the CPU, the peak resident set size of a fresh process per
model/mode, sampled every ms from /proc/self/statm: process-wide, so it includes Python, torch
and the weights (the worker runs with MALLOC_MMAP_THRESHOLD_=128 KiB so that freed tensors leave
the RSS). Each point also carries baseline_bytes: what was held with only the model loaded
(CUDA: weights and buffers; CPU: the worker's RSS); the table shows the peak above it. On the
CPU a worker killed by a signal (the kernel's OOM killer) is an OOM point too.

Outputs (DIR: --out, default runs/memory_wall, gitignored; the committed README figure changes
only with --out results/memory_wall) DIR/memory_wall.json ({"meta", "points"}, rewritten
atomically after every point),
DIR/memory_wall.png (peak memory, decode state bytes and ms/token against the context) and
DIR/memory_wall.md (the table, also printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .measure import PeakMemory, free_memory, is_oom, rss_bytes
from .results import (commit_label, default_out, markdown_table, run_meta, save_figure,
                      write_json, write_text)

GPT2_ATTN = {"gpt2-sdpa": "sdpa", "gpt2-eager": "eager", "gpt2-25m": "sdpa",
             "gpt2-static": "sdpa"}


@dataclass
class WallConfig:
    device: str = "cpu"
    max_tokens: int = 8192
    models: tuple[str, ...] = ("bdh", "gpt2")
    out: str = "runs/memory_wall"          # gitignored; results/memory_wall only when asked
    preset: str = "cpu"
    dtype: str = "float32"
    decode_steps: int = 8
    decode_warmup: int = 2
    bdh_chunk: int = 4096
    gpt2_chunk: int = 4096
    time_budget_s: float = 60.0
    deadline_s: float = 600.0
    rss_budget_gb: float | None = None
    bdh: dict = field(default_factory=dict)
    gpt2: dict = field(default_factory=dict)


PRESETS = {
    # Tiny models: the whole sweep (1k → 8k) runs in about a minute on a laptop CPU.
    # BDH streams in 1024-token chunks, so its prefill memory is flat from the first context.
    "cpu": dict(max_tokens=8192, dtype="float32", decode_steps=8, bdh_chunk=1024,
                time_budget_s=20.0, deadline_s=80.0,
                bdh=dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16,
                         dropout=0.0),
                # matched to BDH's 0.23M parameters (without the position table): width 96
                gpt2=dict(match_bdh=True, n_layer=2, head_dim=32)),
    # The real sizes: the official 25M BDH against the GPT-2 124M shape (byte vocabulary).
    # BDH prefill at 1M tokens streams 64 chunks of 16k. deadline_s keeps the run near 6 min
    # (a sweep may overrun its share by one point, plus building and warming up the models).
    "h100": dict(max_tokens=1 << 20, dtype="bfloat16", decode_steps=8, bdh_chunk=16384,
                 gpt2_chunk=8192, time_budget_s=75.0, deadline_s=330.0,
                 models=("bdh", "gpt2", "gpt2-static", "gpt2-25m"),
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

def n_positions(cfg: WallConfig) -> int:
    return cfg.max_tokens + cfg.decode_warmup + cfg.decode_steps + 1


def bdh_params(cfg: WallConfig) -> int:
    from bdh import BDH, BDHConfig
    with torch.device("meta"):
        return sum(p.numel() for p in BDH(BDHConfig(**cfg.bdh)).parameters())


def gpt2_shape(model_name: str, cfg: WallConfig) -> dict:
    """n_layer / n_embd / n_head of a GPT-2 sweep name. "gpt2-25m", and cfg.gpt2 with
    match_bdh=True, take the width (a multiple of head_dim) whose parameter count without the
    position table (n_positions=0) is closest to BDH's: the table grows with the context the
    model supports, so it is left out of the match and reported on its own."""
    g = dict(cfg.gpt2)
    if model_name == "gpt2-25m":
        g = dict(match_bdh=True, n_layer=6, head_dim=64)
    if g.pop("match_bdh", False):
        from baselines import match_gpt2_config
        c = match_gpt2_config(bdh_params(cfg), n_layer=g["n_layer"], head_dim=g["head_dim"],
                              n_positions=0)
        return dict(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head)
    return g


def build(model_name: str, cfg: WallConfig):
    """The model for a sweep name ('bdh', 'gpt2-sdpa', 'gpt2-eager', 'gpt2-25m'), on cfg.device
    (initialised there: a 1M-row position table is slow to initialise on the CPU)."""
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    with torch.device(cfg.device):
        if model_name == "bdh":
            from bdh import BDH, BDHConfig
            model = BDH(BDHConfig(**cfg.bdh))
        else:
            from baselines import GPT2LM, gpt2_config
            g = gpt2_shape(model_name, cfg)
            model = GPT2LM(gpt2_config(g["n_layer"], g["n_embd"], g["n_head"], vocab_size=256,
                                       n_positions=n_positions(cfg), dropout=0.0,
                                       attn_implementation=GPT2_ATTN[model_name]))
    return model.to(cfg.device, dtype).eval()


def param_counts(cfg: WallConfig) -> dict:
    """Parameter counts per model (GPT-2: total at n_positions, and without the position
    table, which grows with --max-tokens)."""
    from baselines import gpt2_param_count
    out = {}
    names = {n for n, _ in jobs(cfg)}
    if "bdh" in names:
        out["bdh"] = bdh_params(cfg)
    for name in sorted(n for n in names if n.startswith("gpt2")):
        g = gpt2_shape(name, cfg)
        total = gpt2_param_count(g["n_layer"], g["n_embd"], 256, n_positions(cfg))
        out[name] = {**g, "n_positions": n_positions(cfg), "vocab_size": 256, "total": total,
                     "position_table": n_positions(cfg) * g["n_embd"],
                     "without_position_table": total - n_positions(cfg) * g["n_embd"]}
    return out


def _feed(model, name, tokens, state, chunk):
    """Consume ``tokens`` [1,n] into the stream ``state``; returns (last logits, state)."""
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        logits, state = model(tokens[:, s:s + chunk], state=state, return_state=True)
    return logits, state


# ----------------------------------------------------------------------------- sweeps

def _steps(model, name, nxt, state, n):
    """Greedy-decode n tokens after nxt, eagerly. BDH uses its `generate` (the fixed state,
    updated by `hebbian_step`); GPT-2 steps its KV cache. Returns (next token, state)."""
    if n == 0:
        return nxt, state
    if name == "bdh":
        out, state = model.generate(nxt, n, top_k=1, state=state, return_state=True,
                                    cuda_graph=False)
        return out[:, -1:], state            # the state has consumed all returned tokens but this
    for _ in range(n):
        logits, state = model(nxt, state=state, return_state=True)
        nxt = logits[:, -1:].argmax(-1)
    return nxt, state


class _Stepper:
    """Greedy decoding the way a user who cares decodes each model: BDH through a
    `bdh.decode.BDHDecoder` on its state (on CUDA it replays a captured CUDA graph of its step;
    the first step runs eagerly and captures it, so it belongs in the untimed warm-up); GPT-2
    "gpt2-static" steps a StaticCache (fixed shapes) under the memory-efficient SDPA kernel;
    everything else runs `_steps` eagerly, all n tokens in one call (GPT-2: the plain
    transformers loop, DynamicCache)."""

    def __init__(self, model, name, state, device):
        from bdh.decode import BDHDecoder
        self.model, self.name, self.state, self.device = model, name, state, device
        # BDH: the decoder adopts the state's tensors (updated in place, no copy)
        self.decoder = BDHDecoder(model, 1, state=state) if name == "bdh" else None

    def run(self, nxt, n: int):
        """n greedy tokens after nxt; returns the last one."""
        if self.decoder is not None:
            for _ in range(n):
                nxt = self.decoder.step(nxt).argmax(-1, keepdim=True)
            return nxt
        if self.name == "gpt2-static":
            dec, cache, pos = self.state
            for _ in range(n):
                nxt = dec.step(nxt, cache, pos)[:, -1:].argmax(-1)
                pos += 1
            self.state = (dec, cache, pos)
            return nxt
        nxt, self.state = _steps(self.model, self.name, nxt, self.state, n)
        return nxt

    def final_state(self):
        return self.decoder.state if self.decoder is not None else self.state


def decode(model, name, nxt, state, cfg, device):
    """The decode phase at the current context: `decode_warmup` untimed steps, then
    `decode_steps` timed ones. The peak covers the whole phase (KV cache / state resident), and
    is reset when the phase starts. Returns (ms per token, peak, seconds, state, next token)."""
    with PeakMemory(device) as m:
        step = _Stepper(model, name, state, device)
        nxt = step.run(nxt, cfg.decode_warmup)
        sync(device)
        t0 = time.perf_counter()
        nxt = step.run(nxt, cfg.decode_steps)
        sync(device)
        secs = time.perf_counter() - t0
    return 1e3 * secs / cfg.decode_steps, m.peak, m.seconds, step.final_state(), nxt


def _static_context(model, tokens, L, cfg, device, chunk):
    """gpt2-static: a StaticCache sized for L tokens plus the decode phase, filled with the
    context in pieces. Returns (last logits, (decoder, cache, next position), cache bytes)."""
    from baselines.gpt2_decode import GPT2StaticDecoder, make_static_cache
    dec = GPT2StaticDecoder(model.hf, "auto")
    cache = make_static_cache(model.hf, 1, L + cfg.decode_warmup + cfg.decode_steps + 1)
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        logits = dec.prefill(tokens[:, s:s + chunk], cache, s)
    from glassbrain.hf import cache_nbytes
    return logits, (dec, cache, tokens.shape[1]), cache_nbytes(cache)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunk_of(name, cfg):
    return cfg.bdh_chunk if name == "bdh" else cfg.gpt2_chunk


def warm_up(model, name, mode, cfg, device) -> None:
    """Compile/autotune every kernel shape the sweep will use (each piece length of a chunked
    prefill, the first and a stateful piece, the decode step), so that no point's time includes
    it; memory is freed before the sweep starts."""
    chunk = chunk_of(name, cfg)
    try:
        with torch.no_grad():
            if mode == "decode" or name == "bdh":
                for T in sorted({min(L, chunk) for L in contexts(cfg.max_tokens)}):
                    idx = torch.randint(0, 256, (1, T), device=device)
                    logits, st = _feed(model, name, idx, None, chunk)
                    # a stateful piece too; T + piece + 1 decode step stays within GPT-2's
                    # n_positions (max context + decode steps + 1)
                    piece = max(1, min(T // 2, cfg.max_tokens - T))
                    logits, st = _feed(model, name, idx[:, :piece], st, chunk)
                    if mode == "decode":
                        _steps(model, name, logits[:, -1:].argmax(-1), st, 1)
                    del idx, logits, st
            else:
                model(torch.randint(0, 256, (1, min(1024, cfg.max_tokens)), device=device))
    except Exception as exc:                                        # noqa: BLE001
        if not is_oom(exc):                 # an OOM here is met again, and recorded, below
            raise
    free_memory(device)


def _point(name, mode, L, peak=None, state_bytes=None, ms=None, oom=False, base=None):
    """One point: the contract's keys, plus baseline_bytes (memory held before the point's
    work, see `sweep`)."""
    return {"model": name, "mode": mode, "context": L, "peak_bytes": peak,
            "state_bytes": state_bytes, "ms_per_token": ms, "oom": oom, "baseline_bytes": base}


def sweep(name: str, mode: str, cfg: WallConfig, emit, budget_s: float | None = None
          ) -> str | None:
    """Run one model/mode over the contexts, calling emit(point, context_peak) per point.
    Returns why it stopped early (or None)."""
    device = torch.device(cfg.device)
    budget_s = cfg.time_budget_s if budget_s is None else budget_s
    rss_budget = None if cfg.rss_budget_gb is None else cfg.rss_budget_gb * 2**30
    gen = torch.Generator().manual_seed(0)
    model = build(name, cfg)
    # What is held with only the model loaded: its weights and buffers on CUDA (tensor bytes);
    # on the CPU the worker's whole RSS (Python, torch, libraries, weights).
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    warm_up(model, name, mode, cfg, device)
    chunk = chunk_of(name, cfg)
    spent, state, consumed, nxt = 0.0, None, 0, None
    for L in contexts(cfg.max_tokens):
        oom, ctx_peak, phase = False, None, "the forward"
        try:
            with torch.no_grad():
                if mode == "prefill":
                    idx = torch.randint(0, 256, (1, L), generator=gen).to(device)
                    with PeakMemory(device) as m:
                        if name == "bdh":                       # streamed: flat memory
                            _, st = _feed(model, name, idx, None, chunk)
                            sb = st.nbytes()
                            del st
                        else:                                   # one forward, use_cache=False
                            model(idx)
                            sb = None
                    point = _point(name, mode, L, m.peak, sb, 1e3 * m.seconds / L)
                    peak, secs = m.peak, m.seconds
                    del idx
                elif name == "gpt2-static":
                    # A static cache has a fixed length: a new one per context, filled anew.
                    state = None
                    free_memory(device)
                    fill = torch.randint(0, 256, (1, L), generator=gen).to(device)
                    phase = "consuming the context"
                    with PeakMemory(device) as pre:
                        logits, state, sb = _static_context(model, fill, L, cfg, device, chunk)
                    ctx_peak = pre.peak
                    nxt = logits[:, -1:].argmax(-1)
                    del fill, logits
                    phase = "decoding"
                    held = (torch.cuda.memory_allocated(device) if device.type == "cuda"
                            else None)        # what is live when decoding starts (diagnostic)
                    ms, peak, dsecs, state, nxt = decode(model, name, nxt, state, cfg, device)
                    point = _point(name, mode, L, peak, sb, ms)
                    point["held_bytes"] = held
                    secs = pre.seconds + dsecs
                else:
                    fill = torch.randint(0, 256, (1, L - consumed), generator=gen).to(device)
                    phase = "consuming the context"
                    with PeakMemory(device) as pre:
                        logits, state = _feed(model, name, fill, state, chunk)
                    consumed, sb, ctx_peak = L, state.nbytes(), pre.peak   # the state at L
                    nxt = logits[:, -1:].argmax(-1)
                    del fill, logits                  # only the state may be resident now
                    phase = "decoding"
                    held = (torch.cuda.memory_allocated(device) if device.type == "cuda"
                            else None)        # what is live when decoding starts (diagnostic)
                    ms, peak, dsecs, state, nxt = decode(model, name, nxt, state, cfg, device)
                    consumed += cfg.decode_warmup + cfg.decode_steps
                    point = _point(name, mode, L, peak, sb, ms)
                    point["held_bytes"] = held
                    secs = pre.seconds + dsecs
        except Exception as exc:                                    # noqa: BLE001
            if not is_oom(exc):
                raise
            oom = True              # handled below, once the traceback's tensors are released
        if not oom and rss_budget is not None and max(peak, ctx_peak or 0) > rss_budget:
            oom, phase = True, f"peak RSS above --rss-budget-gb {cfg.rss_budget_gb:g}"
        if oom:
            state = point = None
            free_memory(device)
            emit(_point(name, mode, L, oom=True, base=base), None)
            return f"out of memory at {L} tokens ({phase})"
        point["baseline_bytes"] = base
        emit(point, ctx_peak)
        spent += secs
        growth = 4.0 if name.startswith("gpt2") else 2.0          # attention is O(L²)
        if spent + growth * secs > budget_s and L * 2 <= cfg.max_tokens:
            return (f"time budget {budget_s:.0f}s: stopped after {L} tokens "
                    f"(the next point would take ~{growth * secs:.0f}s more)")
    return None


def jobs(cfg: WallConfig) -> list[tuple[str, str]]:
    out = []
    for m in cfg.models:
        if m == "bdh":
            out += [("bdh", "decode"), ("bdh", "prefill")]
        elif m == "gpt2":
            out += [("gpt2-sdpa", "decode"), ("gpt2-sdpa", "prefill"), ("gpt2-eager", "prefill")]
        elif m == "gpt2-eager":                 # eager decode adds nothing over sdpa's
            out += [(m, "prefill")]
        elif m == "gpt2-static":                # the tuned decode; its prefill is sdpa's
            out += [(m, "decode")]
        elif m in GPT2_ATTN:
            out += [(m, "decode"), (m, "prefill")]
        else:
            raise ValueError(f"--models: unknown model {m!r}; expected a comma list of "
                             f"{', '.join(MODEL_NAMES)}")
    # decode sweeps first: they are the headline, and the deadline may cut the last sweeps
    out = [j for j in out if j[1] == "decode"] + [j for j in out if j[1] == "prefill"]
    return out


def _run_job_in_subprocess(cfg: WallConfig, name: str, mode: str, emit, budget_s) -> str | None:
    """CPU: one fresh process per model/mode, so its RSS peak is its own."""
    cmd = [sys.executable, "-m", "experiments.memory_wall", "--_worker",
           json.dumps({"cfg": asdict(cfg), "name": name, "mode": mode, "budget_s": budget_s})]
    # A fixed mmap threshold makes glibc serve every block of 128 KiB or more by mmap and give
    # it back to the OS on free, so the RSS follows the live tensors instead of keeping the
    # high-water mark of earlier points (the default threshold rises after frees, and freed
    # heap memory stays resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    stopped, last = None, None
    for line in proc.stdout:
        msg = json.loads(line)
        if "point" in msg:
            emit(msg["point"], msg.get("context_peak"))
            last = msg["point"]["context"]
        else:
            stopped = msg.get("stopped")
    if proc.wait() < 0:
        # Killed by a signal: on Linux, running out of host memory usually ends with the
        # kernel's OOM killer (SIGKILL) rather than a MemoryError. Record it as the OOM of
        # the point the worker was on.
        L = 1024 if last is None else 2 * last
        if L <= cfg.max_tokens:
            emit(_point(name, mode, L, oom=True), None)
        return (f"out of memory at {L} tokens (worker killed by signal {-proc.returncode}, "
                f"presumably the OOM killer)")
    if proc.returncode != 0:
        raise RuntimeError(f"memory_wall worker for {name}/{mode} failed "
                           f"(exit {proc.returncode}); the points so far are in the JSON")
    return stopped


# ----------------------------------------------------------------------------- output

def plot(points: list[dict], path: Path, meta: dict) -> None:
    """Three panels against the context (log x): peak memory (x = out of memory, > = stopped
    by the time budget), the bytes of the KV cache / BDH state, and ms per token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_s, ax_t) = plt.subplots(1, 3, figsize=(18, 5))
    series = sorted({(p["model"], p["mode"]) for p in points})
    for model, mode in series:
        pts = [p for p in points if p["model"] == model and p["mode"] == mode]
        ok = [p for p in pts if not p["oom"]]
        style = "-" if mode == "decode" else "--"
        label = f"{model} {mode}"
        line, = ax_m.plot([p["context"] for p in ok], [p["peak_bytes"] / 2**30 for p in ok],
                          style, marker="o", label=label)
        color = line.get_color()
        ax_t.plot([p["context"] for p in ok], [p["ms_per_token"] for p in ok], style,
                  marker="o", color=color, label=label)
        if mode == "decode" and any(p["state_bytes"] for p in ok):
            ax_s.plot([p["context"] for p in ok], [p["state_bytes"] / 2**20 for p in ok],
                      style, marker="o", color=color, label=f"{model}")
        level = (ok[-1]["peak_bytes"] if ok else 0) / 2**30
        for p in pts:
            if p["oom"]:
                ax_m.plot(p["context"], level, "x", color="red", markersize=12, mew=3)
                ax_m.annotate("OOM", (p["context"], level), color="red",
                              textcoords="offset points", xytext=(5, 5))
        if ok and "time budget" in meta.get("stopped", {}).get(f"{model}/{mode}", ""):
            ax_m.plot(ok[-1]["context"], level, ">", color=color, markersize=9)
            ax_m.annotate("time cap", (ok[-1]["context"], level), color=color, fontsize=8,
                          textcoords="offset points", xytext=(6, -10))
    for ax in (ax_m, ax_s, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    ax_m.set_ylabel("peak memory (GiB)")
    ax_m.set_title("peak memory (x: out of memory, >: time cap)", fontsize=10)
    ax_m.legend(fontsize=8)
    ax_s.set_yscale("log")
    ax_s.set_ylabel("MiB")
    ax_s.set_title("decode state: GPT-2 KV cache vs BDH state (state.nbytes())", fontsize=10)
    ax_s.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("ms per token")
    ax_t.set_title("ms per token (decode: per new token; prefill: time / L)", fontsize=10)
    counts = [f"{k} {(v if isinstance(v, int) else v['total']) / 1e6:.1f}M"
              for k, v in meta["params"].items()]
    fig.suptitle(figure_title(meta, counts), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def figure_title(meta: dict, counts: list[str]) -> str:
    """The figure's title: device, dtype, the commit that made it ('unknown commit' without
    one, never 'None') and the parameter counts."""
    return (f"memory wall on {meta['device']} ({meta['dtype']}, {commit_label(meta)}); "
            "params: " + ", ".join(counts) + " (GPT-2 incl. its position table)")


def table(points: list[dict]) -> str:
    def mib(b):
        return None if b is None else b / 2**20

    rows = [{"model": p["model"], "mode": p["mode"], "context": p["context"],
             "peak MiB": mib(p["peak_bytes"]),
             "above baseline MiB": (None if p["peak_bytes"] is None
                                    or p.get("baseline_bytes") is None
                                    else mib(p["peak_bytes"] - p["baseline_bytes"])),
             "state MiB": mib(p["state_bytes"]),
             "ms/token": p["ms_per_token"], "oom": "OOM" if p["oom"] else ""}
            for p in points]
    return markdown_table(rows)


# ----------------------------------------------------------------------------- CLI

MODEL_NAMES = ("bdh", "gpt2", "gpt2-sdpa", "gpt2-eager", "gpt2-25m", "gpt2-static")


def model_list(text: str) -> tuple[str, ...]:
    """--models: a comma list of MODEL_NAMES (argparse reports a bad one with the list)."""
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in MODEL_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {', '.join(map(repr, bad)) if bad else 'list ' + repr(text)}; "
            f"expected a comma list of {', '.join(MODEL_NAMES)}")
    return names


def _per_preset(key: str) -> str:
    vals = {p: PRESETS[p].get(key, getattr(WallConfig, key)) for p in sorted(PRESETS)}
    if len(set(vals.values())) == 1:
        return f"{next(iter(vals.values())):g}"
    return ", ".join(f"{v:g} with --preset {p}" if isinstance(v, float) else
                     f"{v} with --preset {p}" for p, v in vals.items())


def build_parser() -> argparse.ArgumentParser:
    # Flags whose default depends on --preset use SUPPRESS (absent: the preset decides) and
    # say the per-preset default in their help; the others show theirs through the formatter.
    p = argparse.ArgumentParser(prog="python -m experiments.memory_wall",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    late = argparse.SUPPRESS
    p.add_argument("--device", choices=["cpu", "cuda"], default=late,
                   help="where to measure (default: cuda with --preset h100, else cpu)")
    p.add_argument("--max-tokens", type=int, default=late,
                   help=f"largest context (default: {_per_preset('max_tokens')})")
    p.add_argument("--models", type=model_list, default=late,
                   help="comma list of bdh, gpt2 (= gpt2-sdpa decode+prefill and gpt2-eager "
                        "prefill), gpt2-sdpa, gpt2-eager, gpt2-25m, gpt2-static (the tuned "
                        "decode: StaticCache + one SDPA kernel) (default: bdh,gpt2; h100 adds "
                        "gpt2-static and gpt2-25m)")
    p.add_argument("--out", default=default_out("memory_wall"),
                   help="output folder (gitignored by default; the committed figures are "
                        "rewritten only with --out results/memory_wall)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: tiny models, about a minute on a laptop; h100: the real sizes")
    p.add_argument("--decode-steps", type=int, default=late,
                   help=f"timed decode steps per point (default: {_per_preset('decode_steps')})")
    p.add_argument("--bdh-chunk", type=int, default=late,
                   help=f"BDH streaming chunk in tokens (default: {_per_preset('bdh_chunk')})")
    p.add_argument("--time-budget-s", type=float, default=late,
                   help="per model/mode: stop growing the context when the next point would "
                        f"exceed it (default: {_per_preset('time_budget_s')})")
    p.add_argument("--deadline-s", type=float, default=late,
                   help="whole run: each sweep's budget is shrunk to its share of what is left "
                        f"(default: {_per_preset('deadline_s')})")
    p.add_argument("--rss-budget-gb", type=float, default=late,
                   help="CPU: a point whose peak RSS exceeds this counts as out of memory "
                        "(default: 80%% of physical memory)")
    p.add_argument("--_worker", default=late, help=argparse.SUPPRESS)
    return p


def parse(argv=None) -> WallConfig:
    absent = ("device", "max_tokens", "models", "decode_steps", "bdh_chunk", "time_budget_s",
              "deadline_s", "rss_budget_gb", "_worker")
    a = build_parser().parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(absent)))
    if a._worker:
        return a._worker
    preset = dict(PRESETS[a.preset])
    models = a.models or tuple(preset.pop("models", ("bdh", "gpt2")))
    preset.pop("models", None)
    cfg = WallConfig(preset=a.preset, out=a.out,
                     device=a.device or ("cuda" if a.preset == "h100" else "cpu"),
                     models=tuple(models), **preset)
    for flag in ("max_tokens", "decode_steps", "bdh_chunk", "time_budget_s", "deadline_s",
                 "rss_budget_gb"):
        if getattr(a, flag) is not None:
            setattr(cfg, flag, getattr(a, flag))
    if cfg.max_tokens < 1024:
        raise SystemExit(f"--max-tokens must be >= 1024 (the first context), got {cfg.max_tokens}")
    if cfg.decode_steps < 1:
        raise SystemExit(f"--decode-steps must be >= 1, got {cfg.decode_steps}")
    if cfg.bdh_chunk < 1:
        raise SystemExit(f"--bdh-chunk must be >= 1, got {cfg.bdh_chunk}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if cfg.device == "cpu" and cfg.rss_budget_gb is None:
        cfg.rss_budget_gb = round(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                  / 2**30, 2)
    return cfg


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    cfg = parse(argv)
    if isinstance(cfg, str):                                      # a CPU worker process
        spec = json.loads(cfg)
        wc = WallConfig(**{**spec["cfg"], "models": tuple(spec["cfg"]["models"])})
        why = sweep(spec["name"], spec["mode"], wc,
                    lambda p, c: print(json.dumps({"point": p, "context_peak": c}), flush=True),
                    spec["budget_s"])
        print(json.dumps({"stopped": why}), flush=True)
        return {}

    out = Path(cfg.out)
    meta = run_meta(cfg.device, dtype=cfg.dtype, preset=cfg.preset, config=asdict(cfg),
                    params=param_counts(cfg), stopped={}, errors={}, context_peak_bytes={},
                    memory=("torch.cuda.max_memory_allocated per point (tensor bytes, not the "
                            "allocator's reserve)" if cfg.device == "cuda"
                            else "peak RSS of a fresh process per model/mode, sampled every ms "
                                 "from /proc/self/statm (includes Python, torch and weights)"),
                    notes=["decode peak: the decode phase only (peak stats reset after the "
                           "context is consumed), with the context's KV cache or state resident; "
                           "the peak while consuming the context is meta.context_peak_bytes",
                           f"decode ms/token: {cfg.decode_steps} timed greedy steps after "
                           f"{cfg.decode_warmup} warm-up steps, batch 1, everything included "
                           "(Python, kernel launches, transformers' per-call logic, BDH's state "
                           "copy in generate): at batch 1 this is mostly host overhead, so it "
                           "compares the two decode loops as a user runs them, not the kernels",
                           "GPT-2 prefill: one forward of L tokens, use_cache=False",
                           f"GPT-2 decode: the context is fed in {cfg.gpt2_chunk}-token chunks "
                           "through the transformers KV cache",
                           "GPT-2 uses a byte vocabulary (256) and n_positions = max context + "
                           "decode steps + 1: its learned position table is part of its memory "
                           "and of meta.params[...]['total']",
                           "gpt2-25m (and the cpu preset's GPT-2): sdpa, 6 (cpu: 2) blocks, "
                           "width matched to BDH's parameter count without the position table "
                           "(meta.params[...]['without_position_table'])",
                           "baseline_bytes (extra key): memory held before the point's work, "
                           "with only the model loaded: on CUDA torch.cuda.memory_allocated "
                           "(weights and buffers); on the CPU the worker's RSS (Python, torch, "
                           "libraries, weights); the table's 'above baseline' is peak minus it",
                           "held_bytes (extra key, decode on CUDA): torch.cuda.memory_allocated "
                           "when the decode phase starts, to tell resident memory from the "
                           "decode's own transient",
                           "a decode point's OOM can happen while consuming the context (chunked "
                           "prefill into the cache) or while decoding: meta.stopped says which",
                           "CPU: a worker killed by a signal (the kernel's OOM killer) is "
                           "recorded as an OOM point",
                           f"BDH prefill streams in chunks of {cfg.bdh_chunk} tokens "
                           f"({cfg.max_tokens // cfg.bdh_chunk} calls at the largest context)"])
    points: list[dict] = []
    todo = jobs(cfg)
    bar = tqdm(total=len(todo) * len(contexts(cfg.max_tokens)), desc="memory wall",
               unit="point")

    def emit(p, context_peak=None):
        points.append(p)
        bar.update(1)
        bar.set_postfix_str(f"{p['model']} {p['mode']} {p['context']}")
        if context_peak is not None:
            meta["context_peak_bytes"].setdefault(p["model"], {})[p["context"]] = context_peak
        write_json(out / "memory_wall.json", {"meta": meta, "points": points})

    for i, (name, mode) in enumerate(todo):
        left = cfg.deadline_s - (time.perf_counter() - t_start)
        budget = max(0.0, min(cfg.time_budget_s, left / (len(todo) - i)))
        try:
            if cfg.device == "cpu":
                why = _run_job_in_subprocess(cfg, name, mode, emit, budget)
            else:
                why = sweep(name, mode, cfg, emit, budget)
        except Exception as exc:                                  # noqa: BLE001
            # Not an OOM (those are points): a bug or a kernel failure. Keep the other sweeps
            # and the points so far; the error is in meta.errors and printed in full here.
            traceback.print_exc()
            meta["errors"][f"{name}/{mode}"] = f"{type(exc).__name__}: {exc}"[:500]
            why = None
            write_json(out / "memory_wall.json", {"meta": meta, "points": points})
        free_memory(cfg.device)
        if why:
            meta["stopped"][f"{name}/{mode}"] = why
    bar.close()
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    result = {"meta": meta, "points": points}
    write_json(out / "memory_wall.json", result)
    md = table(points)
    notes = "\n".join(f"- {n}" for n in meta["notes"])
    write_text(out / "memory_wall.md", md + "\n\n" + notes + "\n")
    try:
        plot(points, out / "memory_wall.png", meta)
    except Exception as exc:                                      # noqa: BLE001
        print(f"plotting failed ({type(exc).__name__}: {exc}); the JSON is complete")
    print(md)
    for k, v in meta["stopped"].items():
        print(f"{k}: {v}")
    for k, v in meta["errors"].items():
        print(f"{k}: FAILED: {v}")
    print(f"wrote {out}/memory_wall.json, .png, .md in {meta['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()

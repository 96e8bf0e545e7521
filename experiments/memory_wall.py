"""The memory wall: GPT-2's memory grows with the context, BDH's does not.

    python -m experiments.memory_wall [--device cpu|cuda] [--max-tokens N] [--models bdh,gpt2]
                                      [--out DIR] [--preset cpu|h100]

For each model, at contexts L = 1024, 2048, … up to --max-tokens (or the first out-of-memory):

* decode:  peak memory and ms per token while generating after a context of L tokens. GPT-2
           decodes through transformers' KV cache, BDH through its fixed-size state. One stream
           per model grows through all the L: before each point it is fed exactly the tokens that
           bring its context to L; then a few untimed greedy steps (their peak is the point's
           peak: the KV cache / the state resident, plus one step's work), then greedy steps
           timed one by one through `experiments.timing` (at least --decode-steps of them and
           a quarter of a second, at most 64): ms/token is their median.
           Each model decodes the way a user who cares would: BDH on CUDA replays a captured
           CUDA graph of its step; "gpt2-sdpa" is the plain transformers loop (DynamicCache, as
           most users run it); "gpt2-static" is the tuned GPT-2 (a StaticCache of fixed shapes
           under the memory-efficient SDPA kernel, `baselines.gpt2_decode`; a new cache per
           context, since a static cache's length is fixed).
* prefill: peak memory and time to consume L tokens from an empty history (one run). GPT-2
           ("gpt2-sdpa" and "gpt2-eager") takes them in one forward call (use_cache=False, as a
           user scoring a document would); BDH streams them through its chunked kernel in
           --bdh-chunk pieces.

Out-of-memory (torch.cuda.OutOfMemoryError; on the CPU a MemoryError or a peak RSS above
--rss-budget-gb) is recorded as a point with "oom": true and ends that model/mode's sweep. A
per-model/mode time budget (--time-budget-s, shrunk so that all sweeps fit in --deadline-s) also
ends a sweep whose next point would not fit (recorded in meta.stopped). GPT-2 is built with
n_positions ≥ the largest context plus the decode steps: its learned position table
(n_positions × n_embd) is part of its memory and parameter count (meta.params gives both).
"gpt2-25m" is GPT-2 (sdpa) matched to BDH's parameter count without the position table (6
blocks, width a multiple of 64).

Memory: on CUDA, torch.cuda.max_memory_allocated (reset per point; for decode, reset after the
context is consumed, so it is the decode phase's peak; the peak while consuming the context is
in meta.context_peak_bytes); on the CPU, the peak resident set size of a fresh process per
model/mode, sampled every ms from /proc/self/statm (the worker runs with
MALLOC_MMAP_THRESHOLD_=128 KiB so that freed tensors leave the RSS; large allocations then
page-fault afresh, which adds about a quarter to GPT-2's CPU decode time, whose cache is copied
every step). Every point carries
baseline_bytes, what was held with only the model loaded (CUDA: weights and buffers; CPU: the
worker's RSS: Python, torch and the weights), and the figure and the table show the peak above
it, in MiB like every size here. On the CPU a worker killed by a signal (the kernel's OOM
killer) is an OOM point too. The CPU preset runs one torch thread (steadier timings on a busy
machine).

Outputs (DIR: --out, default runs/memory_wall, gitignored; the committed README figure changes
only with --out results/memory_wall) DIR/memory_wall.json ({"meta", "points"}, rewritten
atomically after every point), DIR/memory_wall.png (memory above the baseline, decode state
and ms/token against the context) and DIR/memory_wall.md (the table, also printed).

The default CPU run takes about 70 s, five worker processes included (measured on a 2-core CPU
shared with other work).
"""
from __future__ import annotations

import dataclasses
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

from .harness import (DECODE_POLICY, Device, Float, Int, Names, Optional, OutDir, PeakMemory,
                      Stopwatch, commit_label, default_out, free_memory, is_oom, markdown_table,
                      option, parse_config, rss_bytes, run_meta, save_figure, threads_field,
                      time_call, torch_threads, write_json, write_text)

GPT2_ATTN = {"gpt2-sdpa": "sdpa", "gpt2-eager": "eager", "gpt2-25m": "sdpa",
             "gpt2-static": "sdpa"}
MODEL_NAMES = ("bdh", "gpt2", "gpt2-sdpa", "gpt2-eager", "gpt2-25m", "gpt2-static")
MIB = 2 ** 20
WORKER_FLAG = "--_worker"


@dataclass
class WallConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "where to measure"))
    max_tokens: int = field(default=8192, metadata=option(
        Int(1024), "largest context (the first is 1024)"))
    models: tuple = field(default=("bdh", "gpt2"), metadata=option(
        Names(MODEL_NAMES), "comma list of bdh, gpt2 (= gpt2-sdpa decode+prefill and "
                            "gpt2-eager prefill), gpt2-sdpa, gpt2-eager, gpt2-25m, gpt2-static "
                            "(the tuned decode: StaticCache + one SDPA kernel)"))
    out: str = field(default=default_out("memory_wall"), metadata=option(
        OutDir(), "output folder (gitignored by default; the committed figures are rewritten "
                  "only with --out results/memory_wall)"))
    dtype: str = "float32"
    decode_steps: int = field(default=DECODE_POLICY.min_reps, metadata=option(
        Int(1), "decode: at least this many greedy steps timed one by one per point (and a "
                "quarter of a second; at most 64 unless this asks for more)"))
    decode_warmup: int = 2
    bdh_chunk: int = field(default=4096, metadata=option(
        Int(1), "BDH streaming chunk in tokens"))
    gpt2_chunk: int = 4096
    time_budget_s: float = field(default=60.0, metadata=option(
        Float(0), "per model/mode: stop growing the context when the next point would exceed "
                  "it"))
    deadline_s: float = field(default=600.0, metadata=option(
        Float(0), "whole run: each sweep's budget is shrunk to its share of what is left"))
    rss_budget_gb: float | None = field(default=None, metadata=option(
        Optional(Float(0, lo_open=True)), "CPU: a point whose peak RSS exceeds this many GiB "
                                          "counts as out of memory",
        shown="80% of physical memory"))
    threads: int | None = threads_field()
    bdh: dict = field(default_factory=dict)
    gpt2: dict = field(default_factory=dict)

    def decode_policy(self):
        """How each decode point is timed: `DECODE_POLICY` with --decode-steps."""
        return DECODE_POLICY.with_min_reps(self.decode_steps)


PRESETS = {
    # Tiny models: the whole sweep (1k → 8k) in about 70 s on a 2-core CPU. BDH streams in
    # 1024-token chunks, so its prefill memory is flat from the first context.
    "cpu": dict(device="cpu", max_tokens=8192, dtype="float32", bdh_chunk=1024,
                time_budget_s=20.0, deadline_s=80.0, threads=1,
                bdh=dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16,
                         dropout=0.0),
                # matched to BDH's 0.23M parameters (without the position table): width 96
                gpt2=dict(match_bdh=True, n_layer=2, head_dim=32)),
    # The real sizes: the official 25M BDH against the GPT-2 124M shape (byte vocabulary).
    # BDH prefill at 1M tokens streams 64 chunks of 16k. deadline_s keeps the run near 6 min
    # (a sweep may overrun its share by one point, plus building and warming up the models).
    "h100": dict(device="cuda", max_tokens=1 << 20, dtype="bfloat16", bdh_chunk=16384,
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

def decode_tokens(cfg: WallConfig) -> int:
    """The most tokens a decode point adds to its stream (warm-up and timed steps)."""
    policy = cfg.decode_policy()
    return cfg.decode_warmup + policy.warmup + policy.max_reps


def n_positions(cfg: WallConfig) -> int:
    return cfg.max_tokens + decode_tokens(cfg) + 1


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


def feed(model, tokens, state, chunk):
    """Consume ``tokens`` [1,n] into the stream ``state``; returns (last logits, state)."""
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        logits, state = model(tokens[:, s:s + chunk], state=state, return_state=True)
    return logits, state


def chunk_of(name, cfg):
    return cfg.bdh_chunk if name == "bdh" else cfg.gpt2_chunk


# ----------------------------------------------------------------------------- decoding

class Stepper:
    """Greedy decoding the way a user who cares decodes each model: BDH through a
    `bdh.decode.BDHDecoder` on its state (on CUDA it replays a captured CUDA graph of its step;
    the first step runs eagerly and captures it, so it belongs in the untimed warm-up); GPT-2
    "gpt2-static" steps a StaticCache (fixed shapes) under the memory-efficient SDPA kernel;
    every other GPT-2 runs the plain transformers loop (DynamicCache). ``count`` is the tokens
    decoded so far."""

    def __init__(self, model, name, state, nxt):
        from bdh.decode import BDHDecoder
        self.model, self.name, self.state, self.nxt, self.count = model, name, state, nxt, 0
        # BDH: the decoder adopts the state's tensors (updated in place, no copy)
        self.decoder = BDHDecoder(model, 1, state=state) if name == "bdh" else None

    def step(self) -> None:
        """One greedy token after the last one."""
        if self.decoder is not None:
            self.nxt = self.decoder.step(self.nxt).argmax(-1, keepdim=True)
        elif self.name == "gpt2-static":
            dec, cache, pos = self.state
            self.nxt = dec.step(self.nxt, cache, pos)[:, -1:].argmax(-1)
            self.state = (dec, cache, pos + 1)
        else:
            logits, self.state = self.model(self.nxt, state=self.state, return_state=True)
            self.nxt = logits[:, -1:].argmax(-1)
        self.count += 1

    def final_state(self):
        return self.decoder.state if self.decoder is not None else self.state


def decode(model, name, nxt, state, cfg, device):
    """The decode phase at the current context: `decode_warmup` untimed steps under the peak
    memory (reset when the phase starts), then steps timed one by one. Returns (timing, peak
    bytes, stepper)."""
    step = Stepper(model, name, state, nxt)
    with torch.no_grad():
        with PeakMemory(device) as m:
            for _ in range(cfg.decode_warmup):
                step.step()
        timing = time_call(step.step, device, policy=cfg.decode_policy())
    return timing, m.peak, step


def static_context(model, tokens, L, cfg, chunk):
    """gpt2-static: a StaticCache sized for L tokens plus the decode phase, filled with the
    context in pieces. Returns (last logits, (decoder, cache, next position), cache bytes)."""
    from baselines.gpt2_decode import GPT2StaticDecoder, make_static_cache
    from glassbrain.hf import cache_nbytes
    dec = GPT2StaticDecoder(model.hf, "auto")
    cache = make_static_cache(model.hf, 1, L + decode_tokens(cfg) + 1)
    logits = None
    for s in range(0, tokens.shape[1], chunk):
        logits = dec.prefill(tokens[:, s:s + chunk], cache, s)
    return logits, (dec, cache, tokens.shape[1]), cache_nbytes(cache)


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
                    logits, st = feed(model, idx, None, chunk)
                    # a stateful piece too; T + piece + 1 decode step stays within GPT-2's
                    # n_positions (max context + decode steps + 1)
                    piece = max(1, min(T // 2, cfg.max_tokens - T))
                    logits, st = feed(model, idx[:, :piece], st, chunk)
                    if mode == "decode" and name != "gpt2-static":
                        Stepper(model, name, st, logits[:, -1:].argmax(-1)).step()
                    del idx, logits, st
            else:
                model(torch.randint(0, 256, (1, min(1024, cfg.max_tokens)), device=device))
    except Exception as exc:                                        # noqa: BLE001
        if not is_oom(exc):                 # an OOM here is met again, and recorded, below
            raise
    free_memory(device)


# ----------------------------------------------------------------------------- points

def make_point(name, mode, L, peak=None, state_bytes=None, ms=None, oom=False, base=None):
    """One point: the contract's keys, plus baseline_bytes (memory held with only the model
    loaded, see `sweep`)."""
    return {"model": name, "mode": mode, "context": L, "peak_bytes": peak,
            "state_bytes": state_bytes, "ms_per_token": ms, "oom": oom, "baseline_bytes": base}


def decode_point(name, L, timing, peak, state_bytes, held) -> dict:
    point = make_point(name, "decode", L, peak, state_bytes, timing.median_ms)
    point.update(held_bytes=held, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms,
                 timed_steps=timing.reps)
    return point


class Stream:
    """One model's stream through all the contexts of a sweep: what it has consumed, its
    state and its next token. ``point(L)`` measures one context; ``phase`` says what it was
    doing (for an out-of-memory message)."""

    def __init__(self, model, name, mode, cfg, device):
        self.model, self.name, self.mode, self.cfg, self.device = model, name, mode, cfg, device
        self.chunk = chunk_of(name, cfg)
        self.gen = torch.Generator().manual_seed(0)
        self.state, self.consumed, self.phase, self.context_peak = None, 0, "", None

    def tokens(self, n: int) -> torch.Tensor:
        return torch.randint(0, 256, (1, n), generator=self.gen).to(self.device)

    def held(self):
        """What is live when decoding starts (CUDA; a diagnostic)."""
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None

    def point(self, L: int) -> dict:
        self.phase, self.context_peak = "the forward", None
        with torch.no_grad():
            if self.mode == "prefill":
                return self.prefill(L)
            if self.name == "gpt2-static":
                return self.static_decode(L)
            return self.decode(L)

    def prefill(self, L: int) -> dict:
        idx = self.tokens(L)
        with PeakMemory(self.device) as m:
            if self.name == "bdh":                          # streamed: flat memory
                _, st = feed(self.model, idx, None, self.chunk)
                sb = st.nbytes()
            else:                                           # one forward, use_cache=False
                self.model(idx)
                sb = None
        return make_point(self.name, "prefill", L, m.peak, sb, 1e3 * m.seconds / L)

    def decode(self, L: int) -> dict:
        self.phase = "consuming the context"
        with PeakMemory(self.device) as pre:
            logits, self.state = feed(self.model, self.tokens(L - self.consumed), self.state,
                                      self.chunk)
        sb, self.context_peak = self.state.nbytes(), pre.peak        # the state at L
        nxt = logits[:, -1:].argmax(-1)
        del logits                                    # only the state may be resident now
        self.phase, held = "decoding", self.held()
        timing, peak, step = decode(self.model, self.name, nxt, self.state, self.cfg,
                                    self.device)
        self.state, self.consumed = step.final_state(), L + step.count
        return decode_point(self.name, L, timing, peak, sb, held)

    def static_decode(self, L: int) -> dict:
        # A static cache has a fixed length: a new one per context, filled anew.
        self.state = None
        free_memory(self.device)
        self.phase = "consuming the context"
        with PeakMemory(self.device) as pre:
            logits, state, sb = static_context(self.model, self.tokens(L), L, self.cfg,
                                               self.chunk)
        self.context_peak = pre.peak
        nxt = logits[:, -1:].argmax(-1)
        del logits
        self.phase, held = "decoding", self.held()
        timing, peak, _ = decode(self.model, self.name, nxt, state, self.cfg, self.device)
        return decode_point(self.name, L, timing, peak, sb, held)


def sweep(name: str, mode: str, cfg: WallConfig, emit, budget_s: float | None = None
          ) -> str | None:
    """Run one model/mode over the contexts, calling emit(point, context_peak) per point.
    Returns why it stopped early (or None)."""
    device = torch.device(cfg.device)
    budget_s = cfg.time_budget_s if budget_s is None else budget_s
    rss_budget = None if cfg.rss_budget_gb is None else cfg.rss_budget_gb * 2**30
    model = build(name, cfg)
    # What is held with only the model loaded: its weights and buffers on CUDA (tensor bytes);
    # on the CPU the worker's whole RSS (Python, torch, libraries, weights).
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    warm_up(model, name, mode, cfg, device)
    stream, spent = Stream(model, name, mode, cfg, device), 0.0
    for L in contexts(cfg.max_tokens):
        point, why = None, None
        try:
            with Stopwatch(device) as sw:
                point = stream.point(L)
        except Exception as exc:                                    # noqa: BLE001
            if not is_oom(exc):
                raise
            why = f"out of memory at {L} tokens ({stream.phase})"
        if point is not None and rss_budget is not None \
                and max(point["peak_bytes"], stream.context_peak or 0) > rss_budget:
            why = f"out of memory at {L} tokens (peak RSS above --rss-budget-gb " \
                  f"{cfg.rss_budget_gb:g})"
        if why:                     # handled here, once the traceback's tensors are released
            stream.state = point = None
            free_memory(device)
            emit(make_point(name, mode, L, oom=True, base=base), None)
            return why
        point["baseline_bytes"] = base
        emit(point, stream.context_peak)
        spent += sw.seconds
        growth = 4.0 if name.startswith("gpt2") else 2.0          # attention is O(L²)
        if spent + growth * sw.seconds > budget_s and L * 2 <= cfg.max_tokens:
            return (f"time budget {budget_s:.0f}s: stopped after {L} tokens "
                    f"(the next point would take ~{growth * sw.seconds:.0f}s more)")
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
        else:
            out += [(m, "decode"), (m, "prefill")]
    # decode sweeps first: they are the headline, and the deadline may cut the last sweeps
    return [j for j in out if j[1] == "decode"] + [j for j in out if j[1] == "prefill"]


# ----------------------------------------------------------------------------- CPU workers

def run_worker(spec: str) -> None:
    """The CPU worker: one model/mode's sweep in this fresh process, its points as JSON lines
    on stdout."""
    spec = json.loads(spec)
    cfg = WallConfig(**{**spec["cfg"], "models": tuple(spec["cfg"]["models"])})
    with torch_threads(cfg.threads):
        why = sweep(spec["name"], spec["mode"], cfg,
                    lambda p, c: print(json.dumps({"point": p, "context_peak": c}), flush=True),
                    spec["budget_s"])
    print(json.dumps({"stopped": why}), flush=True)


def run_job_in_subprocess(cfg: WallConfig, name: str, mode: str, emit, budget_s) -> str | None:
    """CPU: one fresh process per model/mode, so its RSS peak is its own."""
    cmd = [sys.executable, "-m", "experiments.memory_wall", WORKER_FLAG,
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
            emit(make_point(name, mode, L, oom=True), None)
        return (f"out of memory at {L} tokens (worker killed by signal {-proc.returncode}, "
                f"presumably the OOM killer)")
    if proc.returncode != 0:
        raise RuntimeError(f"memory_wall worker for {name}/{mode} failed "
                           f"(exit {proc.returncode}); the points so far are in the JSON")
    return stopped


# ----------------------------------------------------------------------------- output

def above_baseline_mib(p: dict) -> float | None:
    if p["peak_bytes"] is None or p.get("baseline_bytes") is None:
        return None
    return (p["peak_bytes"] - p["baseline_bytes"]) / MIB


def plot(points: list[dict], path: Path, meta: dict) -> None:
    """Three panels against the context (log x, powers of two): peak memory above the
    model-loaded baseline (x = out of memory, > = stopped by the time budget), the bytes of
    the KV cache / BDH state, and ms per token; every size in MiB."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_s, ax_t) = plt.subplots(1, 3, figsize=(18, 5.2))
    for model, mode in sorted({(p["model"], p["mode"]) for p in points}):
        pts = [p for p in points if p["model"] == model and p["mode"] == mode]
        ok = [p for p in pts if not p["oom"] and above_baseline_mib(p) is not None]
        style, label = ("-" if mode == "decode" else "--"), f"{model} {mode}"
        xs = [p["context"] for p in ok]
        line, = ax_m.plot(xs, [max(above_baseline_mib(p), FLOOR_MIB) for p in ok], style,
                          marker="o", label=label)
        color = line.get_color()
        ax_t.plot([p["context"] for p in pts if p["ms_per_token"]],
                  [p["ms_per_token"] for p in pts if p["ms_per_token"]], style, marker="o",
                  color=color, label=label)
        if mode == "decode" and any(p["state_bytes"] for p in ok):
            ax_s.plot(xs, [p["state_bytes"] / MIB for p in ok], style, marker="o", color=color,
                      label=model)
        mark_stops(ax_m, pts, ok, color, meta.get("stopped", {}).get(f"{model}/{mode}", ""))
    for ax in (ax_m, ax_s, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_m.set_ylabel("MiB above the model-loaded baseline")
    ax_m.set_title(f"peak memory above the baseline (x: out of memory, >: time cap; "
                   f"< {FLOOR_MIB:g} MiB drawn at {FLOOR_MIB:g})", fontsize=9)
    ax_s.set_ylabel("MiB")
    ax_s.set_title("decode state: GPT-2 KV cache vs BDH state (state.nbytes())", fontsize=9)
    ax_t.set_ylabel("ms per token")
    ax_t.set_title("ms per token (decode: median of timed steps; prefill: one run / L)",
                   fontsize=9)
    counts = [f"{k} {(v if isinstance(v, int) else v['total']) / 1e6:.2f}M"
              for k, v in meta["params"].items()]
    fig.suptitle(figure_title(meta, counts), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


FLOOR_MIB = 0.1               # the memory panel is log-scaled: less than this is drawn here


def mark_stops(ax, pts, ok, color, stopped: str) -> None:
    """An x where a sweep ran out of memory, a > where its time budget stopped it."""
    level = max(above_baseline_mib(ok[-1]), FLOOR_MIB) if ok else FLOOR_MIB
    for p in pts:
        if p["oom"]:
            ax.plot(p["context"], level, "x", color="red", markersize=12, mew=3)
            ax.annotate("OOM", (p["context"], level), color="red",
                        textcoords="offset points", xytext=(5, 5))
    if ok and "time budget" in stopped:
        ax.plot(ok[-1]["context"], level, ">", color=color, markersize=9)
        ax.annotate("time cap", (ok[-1]["context"], level), color=color, fontsize=8,
                    textcoords="offset points", xytext=(6, -10))


def figure_title(meta: dict, counts: list[str]) -> str:
    """The figure's title: device, dtype, the commit that made it ('unknown commit' without
    one, never 'None') and the parameter counts."""
    return (f"memory wall on {meta['device']} ({meta['dtype']}, {commit_label(meta)}); "
            "params: " + ", ".join(counts) + " (GPT-2 incl. its position table)")


def table(points: list[dict]) -> str:
    def mib(b):
        return None if b is None else b / MIB

    rows = [{"model": p["model"], "mode": p["mode"], "context": p["context"],
             "above baseline MiB": above_baseline_mib(p), "peak MiB": mib(p["peak_bytes"]),
             "state MiB": mib(p["state_bytes"]), "ms/token": p["ms_per_token"],
             "oom": "OOM" if p["oom"] else ""}
            for p in points]
    return markdown_table(rows)


def make_meta(cfg: WallConfig) -> dict:
    policy = cfg.decode_policy()
    timed = (f"at least {policy.min_reps} (and {policy.budget_s:g} s), at most "
             f"{policy.max_reps}")
    return run_meta(
        cfg.device, dtype=cfg.dtype, preset=cfg.preset, config=asdict(cfg),
        params=param_counts(cfg), stopped={}, errors={}, context_peak_bytes={},
        decode_policy=dataclasses.asdict(policy), torch_threads=cfg.threads,
        memory=("torch.cuda.max_memory_allocated per point (tensor bytes, not the allocator's "
                "reserve)" if cfg.device == "cuda"
                else "peak RSS of a fresh process per model/mode, sampled every ms from "
                     "/proc/self/statm (includes Python, torch and weights)"),
        notes=["decode peak: the decode phase's warm-up steps (peak stats reset after the "
               "context is consumed), with the context's KV cache or state resident; the peak "
               "while consuming the context is meta.context_peak_bytes",
               f"decode ms/token: the median of {timed} greedy steps timed one by one after "
               f"{cfg.decode_warmup} + {policy.warmup} warm-up steps (ms_p20 / ms_p80: the "
               "spread), batch 1, everything included (Python, kernel launches, "
               "transformers' per-call logic): at batch 1 this is mostly host overhead, so it "
               "compares the two decode loops as a user runs them, not the kernels",
               "GPT-2 prefill: one forward of L tokens, use_cache=False",
               f"GPT-2 decode: the context is fed in {cfg.gpt2_chunk}-token chunks through the "
               "transformers KV cache",
               "GPT-2 uses a byte vocabulary (256) and n_positions = max context + decode "
               "steps + 1: its learned position table is part of its memory and of "
               "meta.params[...]['total']",
               "gpt2-25m (and the cpu preset's GPT-2): sdpa, 6 (cpu: 2) blocks, width matched "
               "to BDH's parameter count without the position table "
               "(meta.params[...]['without_position_table'])",
               "baseline_bytes: memory held with only the model loaded: on CUDA "
               "torch.cuda.memory_allocated (weights and buffers); on the CPU the worker's RSS "
               "(Python, torch, libraries, weights); the figure and the table show the peak "
               "above it",
               "held_bytes (decode on CUDA): torch.cuda.memory_allocated when the decode phase "
               "starts, to tell resident memory from the decode's own transient",
               "a decode point's OOM can happen while consuming the context (chunked prefill "
               "into the cache) or while decoding: meta.stopped says which",
               "CPU: a worker killed by a signal (the kernel's OOM killer) is recorded as an "
               "OOM point",
               f"BDH prefill streams in chunks of {cfg.bdh_chunk} tokens "
               f"({cfg.max_tokens // cfg.bdh_chunk} calls at the largest context)"])


def run_sweeps(cfg: WallConfig, meta: dict, t_start: float) -> list[dict]:
    """Every model/mode sweep (CPU: each in its own process), the points written as they
    come; a sweep that fails for another reason than memory is recorded in meta.errors and
    the others still run."""
    out, points, todo = Path(cfg.out), [], jobs(cfg)
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
                why = run_job_in_subprocess(cfg, name, mode, emit, budget)
            else:
                with torch_threads(cfg.threads):
                    why = sweep(name, mode, cfg, emit, budget)
        except Exception as exc:                                  # noqa: BLE001
            traceback.print_exc()
            meta["errors"][f"{name}/{mode}"] = f"{type(exc).__name__}: {exc}"[:500]
            why = None
            write_json(out / "memory_wall.json", {"meta": meta, "points": points})
        free_memory(cfg.device)
        if why:
            meta["stopped"][f"{name}/{mode}"] = why
    bar.close()
    return points


def write_outputs(out: Path, points: list[dict], meta: dict) -> str:
    write_json(out / "memory_wall.json", {"meta": meta, "points": points})
    md = table(points)
    notes = "\n".join(f"- {n}" for n in meta["notes"])
    write_text(out / "memory_wall.md", md + "\n\n" + notes + "\n")
    try:
        plot(points, out / "memory_wall.png", meta)
    except Exception as exc:                                      # noqa: BLE001
        print(f"plotting failed ({type(exc).__name__}: {exc}); the JSON is complete")
    return md


# ----------------------------------------------------------------------------- CLI

def physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def with_rss_budget(cfg: WallConfig) -> None:
    if cfg.device == "cpu" and cfg.rss_budget_gb is None:
        cfg.rss_budget_gb = round(0.8 * physical_memory_gb(), 2)


def parse(argv=None) -> WallConfig:
    return parse_config(WallConfig, PRESETS, argv, prog="python -m experiments.memory_wall",
                        description=__doc__.split("\n\n")[0], derive=with_rss_budget)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKER_FLAG]:
        run_worker(argv[1])
        return {}
    t_start = time.perf_counter()
    cfg = parse(argv)
    meta = make_meta(cfg)
    points = run_sweeps(cfg, meta, t_start)
    meta["seconds"] = round(time.perf_counter() - t_start, 1)
    md = write_outputs(Path(cfg.out), points, meta)
    print(md)
    for k, v in meta["stopped"].items():
        print(f"{k}: {v}")
    for k, v in meta["errors"].items():
        print(f"{k}: FAILED: {v}")
    print(f"wrote {cfg.out}/memory_wall.json, .png, .md in {meta['seconds']:.0f}s")
    return {"meta": meta, "points": points}


if __name__ == "__main__":
    main()

"""Scaling of every token mixer with the context length T: time and peak memory.

    python -m experiments.scaling [--preset cpu|h100] [--device cpu|cuda] [--mixers a,b]
                                  [--lengths 1024,2048] [--long-lengths 262144,1048576] [--out DIR]

One attention layer per mixer (`baselines.build_mixer`: softmax, linear, sliding, deltanet, and
bdh / bsbr when they import), batch B, width d_model, n_head heads. At every T:

* fwd:      y = attn(x) with no autograd, x [B,T,D].
* fwd_bwd:  y = attn(x); y.backward(g) (gradients of x and of the weights).
* stream:   the T tokens fed in pieces of --stream-chunk with the state carried (no autograd);
            one timed run (T may be 1M tokens).
* decode:   one token after a context of T, from the state a stream of T random tokens left:
            ms per token, the step's peak memory, and state.nbytes(). A state is never
            modified by a call, so every repetition decodes the same token at the same
            context. A softmax-type step copies its KV cache (torch.cat, as transformers'
            DynamicCache does), so its decode peak is about twice the cache.

--long-lengths add stream + decode points for the mixers with a bounded state (--long-mixers:
linear, deltanet, bdh, sliding by default), e.g. up to 1M tokens on a GPU.

Timing: `experiments.timing.time_call`, the harness's one policy (CUDA: the median of
`triton.testing.do_bench`; CPU: the median wall clock of at least 5 calls (--reps) and 0.1 s
after one warm-up call). Memory: CUDA, `torch.cuda.max_memory_allocated` (reset before each
point; weights and inputs included); CPU, the process's peak resident set size sampled every ms
(process-wide and sticky across points: rough). An out-of-memory error is a data point
("oom": true) and ends that mixer's sweep of that pass; so does any other error ("error") and a
point that took longer than --max-point-s. Points run shortest T first (every mixer at one T,
then the next T), and none starts after --deadline-s (meta.not_run lists those). The slope of
log(ms) (and log(bytes) for decode) against log(T) is fitted per mixer and pass by least
squares.

Outputs DIR/scaling.json ({"meta", "points", "slopes"}, rewritten after every point),
DIR/scaling.md (tables) and DIR/scaling.png (log-log: fwd, fwd+bwd, decode ms, decode memory).

The default CPU run takes about 30 s (measured on a 2-core CPU shared with other work).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from baselines import build_mixer

from .harness import (Choice, Device, Float, Int, Ints, Names, Optional, OutDir, PeakMemory, POLICY,
                      commit_label, default_out, free_memory, is_oom, loglog_slope, markdown_table,
                      option, parse_config, rss_bytes, run_meta, save_figure, threads_field,
                      time_call, torch_threads, write_json, write_text)

ALL_MIXERS = ("softmax", "linear", "sliding", "deltanet", "bdh", "bsbr")
PASSES = ("fwd", "fwd_bwd", "stream", "decode")


@dataclass
class ScalingConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "where to measure"))
    dtype: str = field(default="float32", metadata=option(
        Choice(("float32", "float16", "bfloat16")), "dtype of the layer and its inputs"))
    mixers: tuple = field(default=ALL_MIXERS, metadata=option(
        Names(ALL_MIXERS), "comma list of token mixers"))
    passes: tuple = field(default=PASSES, metadata=option(Names(PASSES), "comma list of passes"))
    lengths: tuple = field(default=(128, 256, 512, 1024, 2048), metadata=option(
        Ints(1), "context lengths T of every pass"))
    long_lengths: tuple = field(default=(8192,), metadata=option(
        Ints(1, empty=True), "longer T, streamed and decoded only, by --long-mixers"))
    long_mixers: tuple = field(default=("linear", "deltanet", "bdh", "sliding"), metadata=option(
        Names(ALL_MIXERS, empty=True), "the bounded-state mixers that run --long-lengths"))
    d_model: int = field(default=64, metadata=option(Int(1), "layer width"))
    n_head: int = field(default=2, metadata=option(Int(1), "heads"))
    batch: int = field(default=1, metadata=option(Int(1), "batch size"))
    stream_chunk: int = field(default=256, metadata=option(
        Int(1), "tokens per piece of the stream pass"))
    reps: int | None = field(default=None, metadata=option(
        Optional(Int(1)), "at least this many timed calls per point on the CPU",
        shown=f"the harness's {POLICY.min_reps} (and {POLICY.budget_s:g} s)"))
    max_point_s: float = field(default=60.0, metadata=option(
        Float(0), "a point that takes longer ends its mixer/pass sweep (the first excepted)"))
    threads: int | None = threads_field()
    deadline_s: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "start no new point after this many seconds",
        shown="no limit; 540 with --preset h100"))
    window: int | None = field(default=None, metadata=option(
        Optional(Int(1)), "the sliding window's w (tokens)",
        shown="64 with --preset cpu, 1024 with --preset h100"))
    out: str = field(default=default_out("scaling"), metadata=option(OutDir(), "output folder"))
    mixer_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"--d-model: expected a multiple of --n-head {self.n_head}, got "
                             f"{self.d_model}")

    def policy(self):
        """How every repeated call is timed: the harness's policy, with --reps."""
        return POLICY.with_min_reps(self.reps)


PRESETS = {
    # Tiny layers: every mixer and pass at 128 … 2048 tokens (stream / decode of the
    # bounded-state mixers to 8192).
    "cpu": dict(device="cpu", dtype="float32", lengths=(128, 256, 512, 1024, 2048),
                long_lengths=(8192,),
                d_model=64, n_head=2, stream_chunk=256, max_point_s=20.0, threads=1,
                mixer_kwargs={"sliding": {"window": 64}, "bsbr": {"chunk_size": 64}}),
    # A GPT-2-small-wide layer (768 = 12 × 64) in bf16: 1k … 128k for every mixer, and streaming
    # / decoding up to 1M tokens for the bounded-state mixers.
    "h100": dict(device="cuda", dtype="bfloat16",
                 lengths=tuple(1024 * 2 ** i for i in range(8)),
                 long_lengths=(262144, 524288, 1048576), d_model=768, n_head=12,
                 stream_chunk=8192, max_point_s=120.0, deadline_s=540.0,
                 mixer_kwargs={"sliding": {"window": 1024},
                               "bsbr": {"chunk_size": 256, "top_k": 8}}),
}


# ---------------------------------------------------------------- measuring
def time_ms(fn, device: torch.device, policy=POLICY) -> float:
    """Median milliseconds of fn() through the harness (do_bench on CUDA, the wall clock on
    the CPU)."""
    return time_call(fn, device, policy=policy).median_ms


def release(device: torch.device, collect: bool = False) -> None:
    """Return cached CUDA blocks. A full gc.collect (~0.4 s with torch loaded) only after a
    failure, when reference cycles in a traceback may hold tensors; otherwise refcounting
    has already freed them."""
    if collect:
        free_memory(device)
    elif device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bytes(fn, device: torch.device) -> tuple[int, int, float]:
    """(peak bytes while fn() runs, bytes held before it, seconds fn() took)."""
    release(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    with PeakMemory(device) as m:
        fn()
    return int(m.peak), int(base), m.seconds


def time_and_peak(fn, device: torch.device, policy=POLICY) -> tuple[float, int, int]:
    """(median ms, peak bytes, base bytes). The peak comes from one extra run: on CUDA do_bench
    allocates its own L2-flush buffer, and on the CPU the memory-sampling thread would slow the
    timed runs (it takes the GIL every millisecond)."""
    ms = time_ms(fn, device, policy)
    peak, base, _ = peak_bytes(fn, device)
    return ms, peak, base


def stream(attn, x, chunk: int):
    """Feed x [B,T,D] in pieces of ``chunk`` tokens; returns the final state."""
    state = None
    with torch.no_grad():
        for a in range(0, x.shape[1], chunk):
            _, state = attn(x[:, a:a + chunk], state=state, return_state=True)
    return state


def measure_point(attn, pass_name: str, T: int, cfg: ScalingConfig, device, dtype,
                  states: dict | None = None) -> dict:
    """One (mixer, pass, T) measurement. Raises on OOM / errors (the caller records them).
    ``states``: the stream pass leaves its final state there under T; the decode pass at the
    same T takes it (and streams the context itself when it is absent)."""
    states = {} if states is None else states
    B, D = cfg.batch, cfg.d_model
    gen = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(B, T if pass_name != "decode" else 1, D, generator=gen).to(device, dtype)
    if pass_name == "fwd":
        def fn():
            with torch.no_grad():
                attn(x)
    elif pass_name == "fwd_bwd":
        x.requires_grad_(True)
        g = torch.randn(B, T, D, generator=gen).to(device, dtype)

        def fn():
            attn(x).backward(g)
            x.grad = None
    elif pass_name == "stream":
        states.clear()
        # Untimed: the first piece and a stateful one, so that the one timed run holds no
        # compile / autotune of a new piece shape (on the H200 it once added 0.8–12 s to a
        # point: fla's and our kernels tune per shape).
        stream(attn, x[:, :2 * cfg.stream_chunk], cfg.stream_chunk)

        def fn():
            states[T] = stream(attn, x, cfg.stream_chunk)
        peak, base, seconds = peak_bytes(fn, device)     # one timed run: T may be 1M tokens
        return {"ms": seconds * 1e3, "peak_bytes": peak, "base_bytes": base}
    else:
        state = states.pop(T, None)
        if state is None:
            ctx = torch.randn(B, T, D, generator=gen).to(device, dtype)
            state = stream(attn, ctx, cfg.stream_chunk)
            del ctx

        def fn():
            with torch.no_grad():
                attn(x, state=state, return_state=True)
        ms, peak, base = time_and_peak(fn, device, cfg.policy())
        return {"ms": ms, "peak_bytes": peak, "base_bytes": base,
                "state_bytes": int(state.nbytes())}
    ms, peak, base = time_and_peak(fn, device, cfg.policy())
    if pass_name == "fwd_bwd":
        for p in attn.parameters():
            p.grad = None
    return {"ms": ms, "peak_bytes": peak, "base_bytes": base}


# ---------------------------------------------------------------- fitting and reporting
TAIL_POINTS = 3


def slopes(points: list[dict]) -> dict:
    out = {}
    for mixer in sorted({p["mixer"] for p in points}):
        res = {}
        for pass_name in PASSES:
            ok = [p for p in points if p["mixer"] == mixer and p["pass"] == pass_name
                  and p.get("ms") is not None]
            if not ok:
                continue
            res[pass_name] = loglog_slope([p["T"] for p in ok], [p["ms"] for p in ok])
            # The tail: the three longest T, where the work, not launch and dispatch overhead,
            # sets the time (the all-T fit mixes both regimes at small T).
            tail = sorted(ok, key=lambda p: p["T"])[-TAIL_POINTS:]
            res[pass_name + "_tail"] = loglog_slope([p["T"] for p in tail],
                                                    [p["ms"] for p in tail])
            if pass_name == "decode":
                res["decode_peak_bytes"] = loglog_slope([p["T"] for p in ok],
                                                     [p["peak_bytes"] for p in ok])
                # A constant state fits slope 0 exactly (log of equal values).
                res["state_bytes"] = loglog_slope([p["T"] for p in ok],
                                               [p["state_bytes"] for p in ok])
        out[mixer] = res
    return out


def markdown(result: dict) -> str:
    points, sl, meta = result["points"], result["slopes"], result["meta"]
    lines = [f"# Scaling with context length ({meta['device']}, {meta['dtype']}, "
             f"B={meta['config']['batch']}, d_model={meta['config']['d_model']}, "
             f"n_head={meta['config']['n_head']})", ""]
    mixers = sorted({p["mixer"] for p in points})
    for pass_name, unit in (("fwd", "ms"), ("fwd_bwd", "ms"), ("stream", "ms"),
                            ("decode", "ms/token")):
        Ts = sorted({p["T"] for p in points if p["pass"] == pass_name})
        if not Ts:
            continue
        rows = []
        for m in mixers:
            row = {"mixer": m}
            for p in points:
                if p["mixer"] == m and p["pass"] == pass_name:
                    row[str(p["T"])] = ("OOM" if p.get("oom") else "error" if p.get("error")
                                        else p["ms"])
            rows.append(row)
        lines += [f"## {pass_name} ({unit})", "", markdown_table(rows, ["mixer"] + list(
            map(str, Ts))), ""]
    rows = []
    for m in mixers:
        row = {"mixer": m}
        for p in points:
            if p["mixer"] == m and p["pass"] == "decode" and p.get("state_bytes") is not None:
                row[str(p["T"])] = p["state_bytes"] / 2 ** 20
        rows.append(row)
    Ts = sorted({p["T"] for p in points if p["pass"] == "decode"})
    if Ts:
        lines += ["## decode state (MiB)", "", markdown_table(rows, ["mixer"] + list(
            map(str, Ts))), ""]
    cols = ["mixer", *PASSES, "decode_peak_bytes", "state_bytes"]
    lines += ["## log-log slopes against T", "",
              markdown_table([{"mixer": m, **sl[m]} for m in sorted(sl)], cols), "",
              f"## log-log slopes over the {TAIL_POINTS} longest T (the asymptotic regime)", "",
              markdown_table([{"mixer": m, **{p: sl[m].get(p + "_tail") for p in PASSES}}
                              for m in sorted(sl)], ["mixer", *PASSES]), ""]
    return "\n".join(lines)


def plot(points: list[dict], path: Path, meta: dict | None = None) -> None:
    """fwd, fwd+bwd, decode time and decode memory against T, one line per mixer; the title
    says where and at which commit it was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [("fwd", "ms", "forward (ms)"), ("fwd_bwd", "ms", "forward + backward (ms)"),
              ("decode", "ms", "decode (ms / token)"),
              ("decode", "peak_bytes", "decode memory (MiB; dashed: state)")]
    colors = {}
    for ax, (pass_name, key, title) in zip(axes.flat, panels):
        for m in sorted({p["mixer"] for p in points}):
            ok = [p for p in points if p["mixer"] == m and p["pass"] == pass_name
                  and p.get(key) is not None]
            if not ok:
                continue
            scale = 2 ** -20 if key.endswith("bytes") else 1.0
            line, = ax.plot([p["T"] for p in ok], [p[key] * scale for p in ok], "-o",
                            ms=3, label=m, color=colors.get(m))
            colors[m] = line.get_color()
            if key == "peak_bytes":
                ax.plot([p["T"] for p in ok], [p["state_bytes"] * scale for p in ok], "--",
                        color=colors[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    if axes[0, 0].lines:
        axes[0, 0].legend()
    if meta:
        cfg = meta.get("config", {})
        fig.suptitle(f"scaling with context length — {meta.get('device', '?')}, "
                     f"{meta.get('dtype', cfg.get('dtype', '?'))}, one layer of width "
                     f"{cfg.get('d_model', '?')} ({cfg.get('n_head', '?')} heads), "
                     f"{commit_label(meta)}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the sweep
def plan(cfg: ScalingConfig, mixers: list[str]) -> list[tuple[str, str, int]]:
    """(mixer, pass, T) jobs, shortest contexts first: a run cut short by --deadline-s loses the
    longest contexts of every mixer rather than whole mixers. At each T the passes run in the
    order of PASSES, so decode follows the stream that vouches for its state."""
    jobs = []
    for m in mixers:
        for pass_name in cfg.passes:
            Ts = list(cfg.lengths)
            if pass_name in ("stream", "decode") and m in cfg.long_mixers:
                Ts += [T for T in cfg.long_lengths if T not in Ts]
            jobs += [(m, pass_name, T) for T in Ts]
    order = {name: i for i, name in enumerate(PASSES)}
    return sorted(jobs, key=lambda j: (j[2], mixers.index(j[0]), order[j[1]]))


def build(name: str, cfg: ScalingConfig, device, dtype):
    torch.manual_seed(0)
    kw = dict(cfg.mixer_kwargs.get(name, {}))
    return build_mixer(name, cfg.d_model, cfg.n_head, **kw).to(device=device, dtype=dtype)


def run(cfg: ScalingConfig) -> dict:
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    with torch_threads(cfg.threads):
        return _sweep(cfg, device, dtype, Path(cfg.out))


def _sweep(cfg: ScalingConfig, device, dtype, out: Path) -> dict:
    mixers, skipped = [], {}
    for m in cfg.mixers:
        try:
            build(m, cfg, "cpu", torch.float32)
            mixers.append(m)
        except ImportError as e:            # bdh / bsbr not installed or not built yet
            skipped[m] = f"{type(e).__name__}: {e}"
    result = {"meta": run_meta(device, dtype=cfg.dtype, config=asdict(cfg), skipped=skipped,
                               torch_threads=torch.get_num_threads()),
              "points": [], "slopes": {}}
    stopped: dict[tuple[str, str], tuple[str, int]] = {}
    modules: dict[str, torch.nn.Module] = {}          # one layer per mixer: small next to T
    states: dict[str, dict] = {m: {} for m in mixers}   # stream → decode hand-over
    not_run, start = [], time.perf_counter()
    for m, pass_name, T in tqdm(plan(cfg, mixers), desc="scaling"):
        if cfg.deadline_s is not None and time.perf_counter() - start > cfg.deadline_s:
            not_run.append(f"{m}/{pass_name}/{T}")
            continue
        point = {"mixer": m, "pass": pass_name, "T": T, "oom": False, "ms": None,
                 "peak_bytes": None}
        ends = [stopped.get((m, pass_name)), stopped.get((m, "stream")) if pass_name == "decode"
                else None]                                 # decode needs the stream's state
        if any(e is not None and T >= e[1] for e in ends):
            continue                                       # a smaller T already ended the sweep
        if m not in modules:
            modules[m] = build(m, cfg, device, dtype)
        t0 = time.perf_counter()
        try:
            point.update(measure_point(modules[m], pass_name, T, cfg, device, dtype,
                                       states=states[m]))
        except Exception as e:                             # noqa: BLE001 — recorded as data
            if is_oom(e):
                point["oom"] = True
                stopped[(m, pass_name)] = ("oom", T)
            else:
                point["error"] = f"{type(e).__name__}: {e}"
                point["traceback"] = traceback.format_exc(limit=5)
                stopped[(m, pass_name)] = ("error", T)
        finally:
            for p in modules[m].parameters():
                p.grad = None
            if pass_name == "decode" or "error" in point or point["oom"]:
                states[m].clear()
            release(device, collect=point["oom"] or "error" in point)
        point["seconds"] = time.perf_counter() - t0
        # A mixer/pass's first point pays compilation and autotuning (fla, flex, Triton): it
        # does not predict the next T's cost, so it never ends the sweep by time.
        first = not any(p["mixer"] == m and p["pass"] == pass_name for p in result["points"])
        if not first and point["seconds"] > cfg.max_point_s and (m, pass_name) not in stopped:
            stopped[(m, pass_name)] = ("time", T + 1)       # this T counts; larger ones not
        result["points"].append(point)
        result["slopes"] = slopes(result["points"])
        result["meta"]["stopped"] = {f"{a}/{b}": {"reason": v[0], "T": v[1]}
                                     for (a, b), v in stopped.items()}
        write_json(out / "scaling.json", result)
    result["meta"]["not_run"] = not_run                   # left out by --deadline-s
    md = markdown(result)
    write_text(out / "scaling.md", md)
    plot(result["points"], out / "scaling.png", result["meta"])
    write_json(out / "scaling.json", result)
    return result


def with_window(cfg: ScalingConfig) -> None:
    """--window goes to the sliding mixer's arguments."""
    if cfg.window is not None:
        cfg.mixer_kwargs = {**cfg.mixer_kwargs, "sliding": {
            **cfg.mixer_kwargs.get("sliding", {}), "window": cfg.window}}


def parse_args(argv=None) -> ScalingConfig:
    return parse_config(ScalingConfig, PRESETS, argv, prog="python -m experiments.scaling",
                        description=__doc__.split("\n\n")[0], derive=with_window)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    result = run(cfg)
    print(markdown(result))
    print(f"wrote {Path(cfg.out) / 'scaling.json'}, scaling.md, scaling.png")
    return result


if __name__ == "__main__":
    main()

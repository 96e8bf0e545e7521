"""BSBR attention against its peers, in one process: time, peak memory, and decode memory.

    python -m experiments.bench_bsbr [--preset cpu|h100] [--methods a,b] [--lengths 8192,32768]
                                     [--decode-lengths 1024,1048576] [--no-decode] [--out DIR]

Kernel sweep (random inputs, B1 H16 D128, T = 8k, 32k, 64k, 128k, chunk 256, top_k 8, bf16 at
--preset h100), per method and T: forward ms and forward+backward ms (CUDA: median of
`triton.testing.do_bench`; CPU: median wall clock of --reps runs after a warm-up) and the peak
memory of one call (CUDA: torch.cuda.max_memory_allocated after a reset, inputs included; CPU:
process RSS, rough). Methods:
  bsbr         ours, `kernels.bsbr.bsbr_attention` (backend auto: Triton on CUDA), meta dim = D
  bsbr_v1      ours with the first GPU version's paths: PyTorch top-k routing and float32-F
               readout products (`V1_LAUNCH`, passed per call), to time the Triton routing
               and the 16-bit readout products against it in the same process
  bsbr_torch   ours, the blockwise PyTorch backend
  sdpa         torch SDPA, causal (full softmax attention)
  flex_swa     torch.nn.attention.flex_attention with a causal sliding-window block mask of
               --window tokens (compiled on CUDA); skipped if flex_attention does not import
  fla_linear   fla.ops.linear_attn.chunk_linear_attn (skipped if fla is not installed)
  fla_nsa      fla.ops.nsa.parallel_nsa, 16 query heads per kv head, top-k = --top-k blocks of
               64 (skipped if fla is not installed)
Before the kernel sweep (CUDA), the two launch sweeps of `kernels.bsbr.tune` at --tune-T (32k at
--preset h100): the top-k routing forward for each of its ROUTE_CANDIDATES ("tune_routing" in
the JSON), then bsbr fwd+bwd for each of its READOUT_CANDIDATES ("tune"); each stores its
winner in this GPU's tuning cache, and the bsbr rows get both winners as their launch (passed
per call, at every T); then a CUDA kernel profile of one bsbr fwd+bwd at --profile-T
("profile").
An out-of-memory error is a data point (note "out of memory") and ends that method's sweep of
that pass; any other failure is a row with its note. Before timing, ours is checked against the
float64 reference (`kernels.bsbr.naive`) at T = --check-T: output and every input gradient.

Decode sweep: a `BSBRAttention` layer (d_model = H·D) with a bounded bank (--bank slots per
level) consumes L tokens in pieces of --decode-piece, then decodes --decode-tokens tokens one at a
time; peak memory of the decode, ms per token and state.nbytes() per L, up to 1M tokens at
--preset h100 (the bounded bank's memory is flat). The exact (unbounded) bank runs the same
sweep up to --exact-max tokens for contrast, and "vs exact bank" is the relative difference of
the bounded bank's decoded outputs from the exact bank's (same weights and stream; random,
untrained weights, so it shows where merging starts, not a quality figure).

Outputs DIR/bench_bsbr.json ({"meta", "checks", "rows", "slopes", "decode", "decode_summary",
"skipped"}, rewritten after every row), DIR/bench_bsbr.md and DIR/bench_bsbr.png (log-log ms
against T per method, with the least-squares slope in the legend, and the decode memory
against L).

The default (--preset cpu) is a smoke of every code path with tiny sizes: 25 to 40 s (measured
on a 2-core CPU shared with other work); its numbers mean nothing.
"""
from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .harness import (POLICY, Flag, Float, Int, Ints, Names, Optional, OutDir, PeakMemory,
                      Stopwatch, cuda_kernel_profile, default_out, free_memory, is_oom,
                      loglog_slope, markdown_table, option, parse_config, rel_err, run_meta,
                      save_figure, time_call, write_json, write_text)

METHODS = ("bsbr", "bsbr_v1", "bsbr_torch", "sdpa", "flex_swa", "fla_linear", "fla_nsa")
NSA_BLOCK = 64


def check_bank(slots) -> None:
    from bsbr import BankConfig
    try:
        BankConfig(slots_per_level=tuple(slots))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--bank: {exc}") from None


@dataclass
class Sizes:
    """What one run measures: the sizes (defaults: the CPU smoke's) and which parts run."""
    preset: str = "cpu"
    batch: int = 1
    heads: int = field(default=2, metadata=option(Int(1), "attention heads"))
    head_dim: int = field(default=16, metadata=option(Int(1), "head width D"))
    lengths: tuple = field(default=(64, 128, 256), metadata=option(
        Ints(1), "kernel sweep: context lengths T"))
    chunk: int = field(default=16, metadata=option(Int(1), "BSBR chunk size"))
    top_k: int = field(default=2, metadata=option(Int(1), "BSBR routed chunks per query"))
    window: int = field(default=32, metadata=option(Int(1), "flex_swa window (tokens)"))
    dtype: str = "float32"
    reps: int | None = field(default=None, metadata=option(
        Optional(Int(1)), "CPU: at least this many timed calls per measurement",
        shown=f"the harness's {POLICY.min_reps}"))
    check_T: int = field(default=48, metadata=option(Int(1), "T of the reference check"))
    decode_lengths: tuple = field(default=(64, 256, 1024, 4096), metadata=option(
        Ints(1), "decode sweep: context lengths L"))
    exact_max: int = field(default=1024, metadata=option(
        Int(1), "decode sweep: longest context for the exact bank"))
    bank: tuple = field(default=(2, 2, 1), metadata=option(
        Ints(1), "decode sweep: slots per level of the bounded bank"))
    decode_piece: int = field(default=256, metadata=option(
        Int(1), "decode sweep: tokens per streamed piece"))
    decode_tokens: int = field(default=4, metadata=option(
        Int(1), "decode sweep: tokens decoded per point"))
    methods: tuple = field(default=METHODS, metadata=option(
        Names(METHODS), "comma list of the kernel sweep's methods"))
    no_decode: bool = field(default=False, metadata=option(
        Flag(), "skip the decode-memory sweep"))
    kernel_deadline_s: float | None = field(default=None, metadata=option(
        Optional(Float(0)), "start no kernel row after this many seconds (leaves time for the "
                            "decode sweep; skipped rows are listed under not_run)",
        shown="no limit"))
    tune_T: int = field(default=0, metadata=option(
        Int(0), "T of the routing and readout launch sweeps run before the kernels (CUDA "
                "only; 0 = no sweep: the tuning cache's or the default launch)"))
    profile_T: int = field(default=0, metadata=option(
        Int(0), "T of a CUDA kernel profile of one bsbr fwd+bwd (0 = none; CUDA only)"))
    out: str = field(default=default_out("bench_bsbr"), metadata=option(
        OutDir(), "output folder"))

    def check(self) -> None:
        check_bank(self.bank)
        if self.preset == "h100" and not torch.cuda.is_available():
            raise ValueError("--preset: h100 needs a CUDA GPU (run without it for the CPU "
                             "smoke)")

    def policy(self):
        return POLICY.with_min_reps(self.reps)


PRESETS = {
    # A tiny smoke of every code path on a laptop CPU; the numbers mean nothing.
    "cpu": {},
    "h100": dict(heads=16, head_dim=128, lengths=(8192, 32768, 65536, 131072), chunk=256,
                 top_k=8, window=1024, dtype="bfloat16", check_T=4096,
                 decode_lengths=(1024, 4096, 16384, 65536, 262144, 1048576), exact_max=65536,
                 bank=(8, 4, 4), decode_piece=16384, decode_tokens=16, tune_T=32768,
                 profile_T=32768),
}


# ----------------------------------------------------------------------------- measuring

def time_ms(fn, dev: torch.device, policy=POLICY, grads=()) -> float:
    """Median ms of fn() through the harness (do_bench on CUDA, the wall clock on the CPU)."""
    return time_call(fn, dev, policy=policy, grad_to_none=list(grads)).median_ms


def release(dev: torch.device) -> None:
    """Hand freed CUDA blocks back between measurements (on the CPU the gc pass only costs
    time: RSS does not drop anyway)."""
    if dev.type == "cuda":
        free_memory(dev)


def peak_of(fn, dev: torch.device) -> int:
    release(dev)
    with PeakMemory(dev) as m:
        fn()
    return int(m.peak)


# ----------------------------------------------------------------------------- methods

def make_inputs(sz: Sizes, T: int, dev, dtype, seed: int = 0):
    """q, k, v, r, hk [B,H,T,D], random (never zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed + T)
    shape = (sz.batch, sz.heads, T, sz.head_dim)
    # Keys and queries of norm ~1 keep the chunk states and softmax in a sane range.
    return [(torch.randn(shape, generator=g) / math.sqrt(sz.head_dim)).to(dev, dtype)
            for _ in range(5)]


def to_bthd(ins):
    """fla's layout [B,T,H,D], made contiguous once, outside the timed calls."""
    return [t.transpose(1, 2).contiguous() for t in ins]


def v1_launch():
    """The bsbr_v1 method's launch: the PyTorch routing and float32-F readout products."""
    from kernels.bsbr import BSBRLaunch, ReadoutLaunch, RoutingLaunch
    return BSBRLaunch(routing=RoutingLaunch(method="torch"),
                      readout=ReadoutLaunch(products="float32"))


def build_method(name: str, sz: Sizes, T: int, dev, dtype, launch=None):
    """(fn(q, k, v, r, hk) -> output, how many leading inputs it differentiates, prep), where
    prep(inputs) puts the [B,H,T,D] inputs into the method's layout once before timing.
    `launch` (method bsbr only): a kernels.bsbr.BSBRLaunch passed to every call (None: the
    tuning cache's or the default launch). Raises ImportError when the peer is not available."""
    same = list
    if name in ("bsbr", "bsbr_v1", "bsbr_torch"):
        import kernels.bsbr
        backend = "torch" if name == "bsbr_torch" else "auto"
        run_launch = v1_launch() if name == "bsbr_v1" else launch

        def fn(q, k, v, r, hk):
            return kernels.bsbr.bsbr_attention(q, k, v, r, hk, chunk_size=sz.chunk,
                                               top_k=sz.top_k, backend=backend,
                                               launch=run_launch)
        return fn, 5, same
    if name == "sdpa":
        def fn(q, k, v, r, hk):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fn, 3, same
    if name == "flex_swa":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        W = sz.window

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

        mask = create_block_mask(sliding, B=None, H=None, Q_LEN=T, KV_LEN=T, device=str(dev))
        flex = torch.compile(flex_attention) if dev.type == "cuda" else flex_attention

        def fn(q, k, v, r, hk):
            return flex(q, k, v, block_mask=mask)
        return fn, 3, same
    if name == "fla_linear":
        import inspect

        from fla.ops.linear_attn import chunk_linear_attn
        kw = {"head_first": False} if "head_first" in inspect.signature(
            chunk_linear_attn).parameters else {}

        def fn(q, k, v, r, hk):
            o = chunk_linear_attn(q, k, v, **kw)
            return o[0] if isinstance(o, tuple) else o
        return fn, 3, to_bthd
    if name == "fla_nsa":
        import inspect

        from fla.ops.nsa import parallel_nsa
        params = inspect.signature(parallel_nsa).parameters
        Hkv = max(1, sz.heads // 16)         # NSA's kernels want 16 query heads per kv head

        def prep(ins):
            q, k, v, r, hk = to_bthd(ins)
            gate = torch.sigmoid(r[..., 0]).contiguous()              # [B,T,H] gates
            return [q, k[:, :, :Hkv].contiguous(), v[:, :, :Hkv].contiguous(), gate, hk]

        def fn(q, k, v, gate, hk):
            kw = {"block_size": NSA_BLOCK, "block_counts": sz.top_k, "window_size": 0}
            kw.update({g: gate for g in ("g_cmp", "g_slc", "g_swa")})
            o = parallel_nsa(q, k, v, **{a: b for a, b in kw.items() if a in params})
            return o[0] if isinstance(o, tuple) else o
        return fn, 4, prep
    raise ValueError(f"method: expected one of {METHODS}, got {name!r}")


# ----------------------------------------------------------------------------- items

class Bench:
    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "checks": [], "rows": [], "slopes": {}, "decode": [],
                     "decode_summary": {}, "skipped": {}, "tune": None, "profile": None}

    def save(self) -> None:
        write_json(self.out / "bench_bsbr.json", self.data)


def note_of(exc: BaseException) -> str:
    if is_oom(exc):
        return "out of memory"
    if isinstance(exc, NotImplementedError):       # e.g. flex_attention's backward on a CPU
        return f"unsupported: {(str(exc).splitlines() or [''])[0][:120]}"
    traceback.print_exc()
    return f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def check_against_reference(b: Bench, sz: Sizes, dev, dtype) -> None:
    """Ours (backend auto, in float32 and the run's dtype) against the float64 reference at
    T = check_T: relative error of the output and of each input gradient."""
    from kernels.bsbr import bsbr_attention, bsbr_attention_ref
    T = sz.check_T
    for dt in dict.fromkeys([torch.float32, dtype]):
        if dt == torch.bfloat16 and dev.type != "cuda":
            continue
        ins = make_inputs(sz, T, dev, dt, seed=1)
        do = make_inputs(sz, T, dev, dt, seed=2)[2]
        outs, grads = [], []
        for fn, cast in ((lambda *a: bsbr_attention(*a, chunk_size=sz.chunk, top_k=sz.top_k),
                          dt),
                         (lambda *a: bsbr_attention_ref(*a, chunk_size=sz.chunk,
                                                        top_k=sz.top_k), torch.float64)):
            xs = [t.detach().to(cast).requires_grad_(True) for t in ins]
            o = fn(*xs)
            o.backward(do.to(cast))
            outs.append(o)
            grads.append([t.grad for t in xs])
        row = {"T": T, "dtype": str(dt).replace("torch.", ""), "out": rel_err(*outs)}
        for name, g_ours, g_ref in zip(("dq", "dk", "dv", "dr", "dhk"), *grads):
            row[name] = rel_err(g_ours, g_ref)
        b.data["checks"].append(row)
        b.save()
        print("check vs float64 reference:", {k: (f"{v:.2e}" if isinstance(v, float) else v)
                                              for k, v in row.items()}, flush=True)
        del ins, outs, grads
        release(dev)


def sweep_shape(sz: Sizes, dtype, T: int):
    from kernels.bsbr.tune import SweepShape
    return SweepShape(T=T, batch=sz.batch, heads=sz.heads, head_dim=sz.head_dim,
                      chunk_size=sz.chunk, top_k=sz.top_k, dtype=dtype)


def sweep_record(report: dict, T: int) -> dict:
    """A sweep's report as JSON: its rows and its winner's fields."""
    best = report["best"]
    return {"T": T, "shape_class": report["shape_class"], "rows": report["rows"],
            "best": dataclasses.asdict(best) if best is not None else None,
            "cache": report["path"]}


def tune_launch(b: Bench, sz: Sizes, dev, dtype, T: int):
    """The routing sweep, then the readout sweep at its winner (kernels.bsbr.tune; both store
    their winners in the tuning cache); returns the BSBRLaunch of the two winners."""
    from kernels.bsbr import BSBRLaunch
    from kernels.bsbr.tune import tune_readout, tune_routing
    shape = sweep_shape(sz, dtype, T)
    route = tune_routing(shape, dev)
    b.data["tune_routing"] = sweep_record(route, T)
    b.save()
    print("routing launch sweep:", b.data["tune_routing"], flush=True)
    readout = tune_readout(shape, dev, routing=route["best"])
    b.data["tune"] = sweep_record(readout, T)
    b.save()
    print("readout launch sweep:", b.data["tune"], flush=True)
    return BSBRLaunch(routing=route["best"], readout=readout["best"])


def profile_bsbr(b: Bench, sz: Sizes, dev, dtype, T: int, launch) -> None:
    """CUDA time per kernel of one bsbr fwd+bwd at T (``launch``, a BSBRLaunch or None, passed
    to the call as to the bsbr rows)."""
    import kernels.bsbr
    ins = make_inputs(sz, T, dev, dtype)
    leaves = [t.detach().requires_grad_(True) for t in ins]
    do = torch.randn_like(ins[2])

    def step(i):
        kernels.bsbr.bsbr_attention(*leaves, chunk_size=sz.chunk, top_k=sz.top_k,
                                    launch=launch).backward(do)
        for t in leaves:
            t.grad = None
    try:
        rows = cuda_kernel_profile(step, steps=2, top=20)
        b.data["profile"] = {"T": T, "pass": "fwd_bwd", "rows": rows,
                             "us_total": sum(r["us_total"] for r in rows)}
    except Exception as exc:                        # noqa: BLE001 (a note, not a crash)
        b.data["profile"] = {"T": T, "note": note_of(exc)}
    b.save()
    release(dev)


def bench_kernels(b: Bench, sz: Sizes, methods: list[str], dev, dtype,
                  deadline_s: float | None = None, launch=None) -> None:
    """Shortest T first across all methods, so a run cut short (by --kernel-deadline-s or a
    time limit) still has every method at the lengths it reached."""
    stopped = {}                                    # (method, pass) -> T where it ran out
    jobs = [(m, T) for T in sz.lengths for m in methods]
    start = time.perf_counter()
    for m, T in tqdm(jobs, desc="kernels"):
        if m in b.data["skipped"]:
            continue
        if deadline_s is not None and time.perf_counter() - start > deadline_s:
            b.data.setdefault("not_run", []).append(f"{m}/{T}")
            continue
        row = {"method": m, "T": T, "fwd_ms": None, "fwd_bwd_ms": None, "fwd_peak_bytes": None,
               "fwd_bwd_peak_bytes": None, "note": None}
        try:
            fn, n_grad, prep = build_method(m, sz, T, dev, dtype, launch)
        except ImportError as exc:
            b.data["skipped"][m] = f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:                    # noqa: BLE001 (a row, not a crash)
            row["note"] = note_of(exc)
            b.data["rows"].append(row)
            continue
        notes = []
        try:
            ins = prep(make_inputs(sz, T, dev, dtype))
        except Exception as exc:                    # noqa: BLE001
            row["note"] = f"inputs: {note_of(exc)}"
            b.data["rows"].append(row)
            release(dev)
            continue
        for pass_name in ("fwd", "fwd_bwd"):
            if (m, pass_name) in stopped:
                notes.append(f"{pass_name}: skipped (out of memory at T={stopped[m, pass_name]})")
                continue
            try:
                if pass_name == "fwd":
                    def call():
                        with torch.no_grad():
                            fn(*ins)
                    leaves = ()
                else:
                    leaves = [t.detach().requires_grad_(True) for t in ins[:n_grad]]
                    args = leaves + ins[n_grad:]
                    with torch.no_grad():
                        do = torch.randn_like(fn(*ins))

                    def call():
                        fn(*args).backward(do)
                row[f"{pass_name}_ms"] = time_ms(call, dev, sz.policy(), leaves)
                row[f"{pass_name}_peak_bytes"] = peak_of(call, dev)
            except Exception as exc:                # noqa: BLE001
                note = note_of(exc)
                if note == "out of memory":
                    stopped[m, pass_name] = T
                notes.append(f"{pass_name}: {note}")
            finally:
                release(dev)
        row["note"] = "; ".join(notes) or None
        b.data["rows"].append(row)
        b.save()
        ins = None                                   # free the inputs before the next T
        release(dev)
    b.data["slopes"] = fit_slopes(b.data["rows"])


def fit_slopes(rows: list[dict]) -> dict:
    """Least-squares slope of log(ms) against log(T) per method and pass (>= 2 points)."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        for pass_name in ("fwd", "fwd_bwd"):
            ok = [r for r in rows if r["method"] == m and r[f"{pass_name}_ms"]]
            slope = loglog_slope([r["T"] for r in ok], [r[f"{pass_name}_ms"] for r in ok])
            if slope is not None:
                out.setdefault(m, {})[pass_name] = slope
    return out


def stream_and_decode(attn, L: int, sz: Sizes, dev, dtype) -> tuple[dict, torch.Tensor]:
    """Stream L random tokens into ``attn`` in pieces, then decode ``decode_tokens`` one at a
    time from the state: (the row's measurements, the decoded outputs in float64)."""
    D = sz.heads * sz.head_dim
    g = torch.Generator(device="cpu").manual_seed(L)
    piece = torch.randn(1, min(sz.decode_piece, L), D, generator=g).to(dev, dtype)
    with torch.no_grad():
        with Stopwatch(dev) as prefill:
            st, done = None, 0
            while done < L:
                n = min(piece.shape[1], L - done)
                _, st = attn(piece[:, :n], state=st, return_state=True)
                done += n
        tok, ys, s = piece[:, :1], [], st
        release(dev)
        with PeakMemory(dev) as pm:
            for _ in range(sz.decode_tokens):
                y, s = attn(tok, state=s, return_state=True)
                ys.append(y)
    return ({"prefill_s": prefill.seconds, "state_bytes": st.nbytes(),
             "decode_peak_bytes": int(pm.peak),
             "decode_ms_per_token": 1e3 * pm.seconds / sz.decode_tokens},
            torch.cat(ys, 1).double().cpu())


def bench_decode(b: Bench, sz: Sizes, dev, dtype) -> None:
    """Stream L tokens into a BSBRAttention layer, then decode: flat memory with a bounded bank."""
    from bsbr import BankConfig, BSBRAttention
    variants = [("bounded", BankConfig(slots_per_level=tuple(sz.bank))), ("exact", None)]
    jobs = [(name, bank, L) for name, bank in variants for L in sz.decode_lengths
            if bank is not None or L <= sz.exact_max]
    layers, decoded = {}, {}
    for name, bank, L in tqdm(jobs, desc="decode"):
        row = {"bank": name, "L": L, "state_bytes": None, "decode_peak_bytes": None,
               "decode_ms_per_token": None, "prefill_s": None, "vs_exact_rel_err": None,
               "note": None}
        try:
            if name not in layers:
                torch.manual_seed(0)
                layers[name] = BSBRAttention(sz.heads * sz.head_dim, sz.heads, sz.chunk,
                                             top_k=sz.top_k, bank=bank).to(dev, dtype).eval()
            measured, decoded[name, L] = stream_and_decode(layers[name], L, sz, dev, dtype)
            row.update(measured)
        except Exception as exc:                    # noqa: BLE001
            row["note"] = note_of(exc)
        finally:
            release(dev)
        b.data["decode"].append(row)
        b.data["decode_summary"] = decode_summary(b.data["decode"])
        b.save()
    # The bounded bank's price: its decoded outputs against the exact bank's (same weights,
    # same stream), where both ran. 0 while nothing has merged.
    for row in b.data["decode"]:
        if row["bank"] == "bounded" and ("exact", row["L"]) in decoded \
                and ("bounded", row["L"]) in decoded:
            row["vs_exact_rel_err"] = rel_err(decoded["bounded", row["L"]],
                                              decoded["exact", row["L"]])
    b.save()


def decode_summary(rows: list[dict]) -> dict:
    """Per bank: the decode peak and the state size at the longest context over the shortest
    (1.0 = flat)."""
    out = {}
    for name in dict.fromkeys(r["bank"] for r in rows):
        ok = sorted((r for r in rows if r["bank"] == name and r["decode_peak_bytes"]),
                    key=lambda r: r["L"])
        if len(ok) >= 2:
            out[name] = {"L_min": ok[0]["L"], "L_max": ok[-1]["L"],
                         "peak_ratio": ok[-1]["decode_peak_bytes"] / ok[0]["decode_peak_bytes"],
                         "state_ratio": ok[-1]["state_bytes"] / ok[0]["state_bytes"]}
    return out


# ----------------------------------------------------------------------------- outputs

def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, pass_name, title in ((axes[0], "fwd", "forward"),
                                 (axes[1], "fwd_bwd", "forward + backward")):
        for m in dict.fromkeys(r["method"] for r in data["rows"]):
            pts = [(r["T"], r[f"{pass_name}_ms"]) for r in data["rows"]
                   if r["method"] == m and r[f"{pass_name}_ms"]]
            if not pts:
                continue
            slope = data["slopes"].get(m, {}).get(pass_name)
            label = m if slope is None else f"{m} (slope {slope:.2f})"
            ax.plot(*zip(*pts), "-o", ms=4, label=label)
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="ms", title=title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:                    # a run whose kernel rows were all cut has no lines
            ax.legend(fontsize=8)
    ax = axes[2]
    for name in dict.fromkeys(r["bank"] for r in data["decode"]):
        ok = [r for r in data["decode"] if r["bank"] == name and r["decode_peak_bytes"]]
        if ok:
            line, = ax.plot([r["L"] for r in ok], [r["decode_peak_bytes"] / 2**20 for r in ok],
                            "-o", ms=4, label=f"{name} bank: decode peak")
            ax.plot([r["L"] for r in ok], [r["state_bytes"] / 2**20 for r in ok], "--",
                    color=line.get_color(), label=f"{name} bank: state")
    ax.set(xscale="log", yscale="log", xlabel="context L (tokens)", ylabel="MiB",
           title="BSBRAttention decode memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def markdown(data: dict) -> str:
    meta = data["meta"]
    gb = lambda v: None if v is None else v / 1e9          # noqa: E731
    sdpa = {(r["T"], p): r[f"{p}_ms"] for r in data["rows"] if r["method"] == "sdpa"
            for p in ("fwd", "fwd_bwd")}

    def vs_sdpa(r, p):
        peer = sdpa.get((r["T"], p))
        return peer / r[f"{p}_ms"] if peer and r[f"{p}_ms"] else None

    rows = [{"method": r["method"], "T": r["T"], "fwd ms": r["fwd_ms"],
             "fwd+bwd ms": r["fwd_bwd_ms"], "fwd x sdpa": vs_sdpa(r, "fwd"),
             "fwd+bwd x sdpa": vs_sdpa(r, "fwd_bwd"), "fwd peak GB": gb(r["fwd_peak_bytes"]),
             "fwd+bwd peak GB": gb(r["fwd_bwd_peak_bytes"]), "note": r["note"]}
            for r in data["rows"]]
    slopes = [{"method": m, "fwd slope": s.get("fwd"), "fwd+bwd slope": s.get("fwd_bwd")}
              for m, s in data["slopes"].items()]
    dec = [{"bank": r["bank"], "L": r["L"], "state MiB": None if r["state_bytes"] is None
            else r["state_bytes"] / 2**20,
            "decode peak MiB": None if r["decode_peak_bytes"] is None
            else r["decode_peak_bytes"] / 2**20,
            "ms/token": r["decode_ms_per_token"], "vs exact bank": r["vs_exact_rel_err"],
            "note": r["note"]} for r in data["decode"]]
    lines = ["# BSBR benchmark", "",
             f"{meta['device']}, commit {meta['commit']}, {meta['date']}; sizes "
             f"{meta['sizes']}", "", "## check against the float64 reference (relative error)",
             "", markdown_table(data["checks"]), "", "## kernels", "", markdown_table(rows), "",
             "x sdpa: SDPA's ms / this method's ms at the same T (> 1: faster than SDPA).", "",
             "## log-log slope of ms against T", "", markdown_table(slopes), "",
             "## decode memory (BSBRAttention)", "", markdown_table(dec), "",
             "longest over shortest context (1.0 = flat):", "",
             markdown_table([{"bank": k, **v} for k, v in data["decode_summary"].items()]), ""]
    if data.get("tune_routing"):
        tr = data["tune_routing"]
        lines += [f"## top-k routing launch sweep (forward at T = {tr['T']}; the bsbr rows use "
                  f"the fastest that picks the first row's slots but for near-ties, "
                  f"{tr['best']})", "", markdown_table(tr["rows"]), ""]
    if data.get("tune"):
        tune = data["tune"]
        lines += [f"## grouped readout launch sweep (bsbr fwd+bwd at T = {tune['T']}; the bsbr "
                  f"rows use the fastest, {tune['best']})", "", markdown_table(tune["rows"]), ""]
    prof = data.get("profile")
    if prof and prof.get("rows"):
        lines += [f"## CUDA kernels of one bsbr fwd+bwd at T = {prof['T']} (µs; top 20 sum "
                  f"{prof['us_total']:.0f} µs)", "", markdown_table(prof["rows"]), ""]
    if data["skipped"]:
        lines += ["skipped: " + "; ".join(f"{m} ({why})" for m, why in data["skipped"].items()),
                  ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def parse(argv=None) -> Sizes:
    return parse_config(Sizes, PRESETS, argv, prog="python -m experiments.bench_bsbr",
                        description=__doc__.split("\n\n")[0])


def make_meta(sz: Sizes, dev) -> dict:
    return run_meta(dev, preset=sz.preset, sizes=asdict(sz), methods=list(sz.methods),
                    notes=["peak bytes: CUDA max_memory_allocated over one call, inputs "
                           "included; CPU: process RSS (rough)",
                           "ms: the harness's time_call (CUDA do_bench median; CPU wall-clock "
                           "median)",
                           "bsbr meta dim = head dim; flex_swa window = sizes.window; fla_nsa: "
                           f"{NSA_BLOCK}-token blocks, top_k blocks, 16 query heads per kv "
                           "head, no sliding branch"])


def main(argv=None) -> dict:
    sz = parse(argv)
    dev = torch.device("cuda" if sz.preset == "h100" else "cpu")
    dtype = getattr(torch, sz.dtype)
    if dev.type == "cpu":
        print("CPU smoke: tiny sizes; the timings mean nothing (run --preset h100 on a GPU)")
    out = Path(sz.out)
    b = Bench(out, make_meta(sz, dev))
    b.save()
    check_against_reference(b, sz, dev, dtype)
    launch = None
    if sz.tune_T and "bsbr" in sz.methods and dev.type == "cuda":
        launch = tune_launch(b, sz, dev, dtype, sz.tune_T)
    if sz.profile_T and "bsbr" in sz.methods and dev.type == "cuda":
        profile_bsbr(b, sz, dev, dtype, sz.profile_T, launch)
    bench_kernels(b, sz, list(sz.methods), dev, dtype, sz.kernel_deadline_s, launch)
    b.save()
    if not sz.no_decode:
        bench_decode(b, sz, dev, dtype)
    b.save()
    plot(b.data, out / "bench_bsbr.png")
    write_text(out / "bench_bsbr.md", markdown(b.data))
    print(markdown(b.data))
    print(f"wrote {out}/bench_bsbr.json, bench_bsbr.md and bench_bsbr.png")
    return b.data


if __name__ == "__main__":
    main()

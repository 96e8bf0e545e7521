"""BDH end-to-end benchmarks against the official model, in one process.

    python -m experiments.bench_bdh [--official-bdh DIR] [--items train,prefill,generate]
                                    [--out DIR] [--no-compile]

* train:    one training step at the official preset (B32, T512, bf16 autocast, AdamW lr 1e-3,
            wd 0.1): tokens/s (median of timed steps) and peak memory; ours eager and compiled,
            the official model eager and compiled.
* prefill:  batch 1, T = 16384, no grad, bf16: ms and peak memory, ours vs the official forward;
            ours streaming 65k, 262k and 1M tokens in 16k chunks (memory must stay flat).
* generate: batch 1, greedy: tokens/s after a 1k and a 100k-token prompt (ours: prefill once,
            then the fixed-size state); the official `generate` at 1k (it re-runs the prefix).

`--official-bdh DIR` is a folder holding the official pathwaycom/bdh `bdh.py`, imported by path
at run time (never vendored). On a CPU it runs a tiny smoke of the same code paths and says
that timings need a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from .measure import PeakMemory, free_memory, is_oom
from .results import markdown_table, run_meta, write_json


def load_official(folder: str | None):
    if not folder:
        return None
    path = Path(folder) / "bdh.py"
    if not path.exists():
        raise SystemExit(f"--official-bdh: no bdh.py in {folder}")
    spec = importlib.util.spec_from_file_location("official_bdh", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps):
    """Median seconds of ``reps`` calls after one warm-up, and the peak memory of the calls."""
    fn()
    times = []
    with PeakMemory(dev) as m:
        for _ in range(reps):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), m.peak


def bench_train(name, model, dev, B, T, reps, rows):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1,
                            fused=dev.type == "cuda")
    x = torch.randint(0, 256, (B, T), device=dev)
    y = torch.randint(0, 256, (B, T), device=dev)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    def step():
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                                     # compile / autotune
    sec, peak = timed(step, dev, reps)
    rows.append({"item": "train step", "impl": name, "shape": f"B{B} T{T}", "ms": sec * 1e3,
                 "tok/s": B * T / sec, "peak GB": peak / 1e9})


def run_item(rows, label, impl, fn):
    try:
        fn()
    except Exception as exc:                                   # noqa: BLE001
        if not is_oom(exc):
            raise
        rows.append({"item": label, "impl": impl, "note": "out of memory"})
    finally:
        free_memory("cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-bdh", default=None)
    p.add_argument("--items", default="train,prefill,generate")
    p.add_argument("--out", default="results/bench_bdh")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    items = set(a.items.split(","))
    off = load_official(a.official_bdh)
    from bdh import BDH, BDHConfig

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        cfg_kw, B, T, reps = {}, 32, 512, 10
        prefill_T, stream_T, prompts, new_tokens = 16384, [1 << 16, 1 << 18, 1 << 20], \
            [1024, 100_000], 64
    else:
        print("no GPU: a tiny smoke of the benchmark code paths; timings need a GPU")
        cfg_kw = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8)
        B, T, reps = 2, 64, 2
        prefill_T, stream_T, prompts, new_tokens = 256, [512], [128], 4
    rows = []

    def ours(**kw):
        torch.manual_seed(0)
        return BDH(BDHConfig(**cfg_kw, **kw)).to(dev)

    def official():
        torch.manual_seed(0)
        return off.BDH(off.BDHConfig(**cfg_kw)).to(dev)

    if "train" in items:
        m = ours()
        run_item(rows, "train step", "ours eager", lambda: bench_train("ours eager", m, dev, B,
                                                                      T, reps, rows))
        if gpu and not a.no_compile:
            run_item(rows, "train step", "ours compiled",
                     lambda: bench_train("ours compiled", torch.compile(m), dev, B, T, reps, rows))
        del m
        if off is not None:
            m = official()
            run_item(rows, "train step", "official eager",
                     lambda: bench_train("official eager", m, dev, B, T, reps, rows))
            if gpu and not a.no_compile:
                run_item(rows, "train step", "official compiled",
                         lambda: bench_train("official compiled", torch.compile(m), dev, B, T,
                                             reps, rows))
            del m

    dt = torch.bfloat16 if gpu else torch.float32
    if "prefill" in items:
        with torch.no_grad():
            m = ours(dropout=0.0).to(dt).eval()
            idx = torch.randint(0, 256, (1, prefill_T), device=dev)

            def ours_prefill():
                sec, peak = timed(lambda: m(idx), dev, 3)
                rows.append({"item": "prefill", "impl": "ours", "shape": f"T{prefill_T}",
                             "ms": sec * 1e3, "tok/s": prefill_T / sec, "peak GB": peak / 1e9})
            run_item(rows, "prefill", "ours", ours_prefill)
            if off is not None:
                mo = official().to(dt).eval()

                def off_prefill():
                    sec, peak = timed(lambda: mo(idx), dev, 3)
                    rows.append({"item": "prefill", "impl": "official", "shape": f"T{prefill_T}",
                                 "ms": sec * 1e3, "tok/s": prefill_T / sec,
                                 "peak GB": peak / 1e9})
                run_item(rows, "prefill", "official", off_prefill)
                del mo
            for L in stream_T:
                def stream(L=L):
                    chunk = min(16384, L)
                    toks = torch.randint(0, 256, (1, chunk), device=dev)
                    with PeakMemory(dev) as pm:
                        st = None
                        for _ in range(L // chunk):
                            _, st = m(toks, state=st, return_state=True)
                    rows.append({"item": "prefill stream", "impl": "ours",
                                 "shape": f"T{L} in {chunk} chunks", "ms": pm.seconds * 1e3,
                                 "tok/s": L / pm.seconds, "peak GB": pm.peak / 1e9})
                run_item(rows, "prefill stream", "ours", stream)
            del m

    if "generate" in items:
        with torch.no_grad():
            m = ours(dropout=0.0).to(dt).eval()
            for P in prompts:
                def gen(P=P):
                    prompt = torch.randint(0, 256, (1, P), device=dev)
                    m.generate(prompt[:, :16], 4, top_k=1)               # warm-up
                    _sync(dev)
                    t0 = time.perf_counter()
                    _, st = m.generate(prompt, 0, return_state=True)   # consumes all but the last
                    _sync(dev)
                    t1 = time.perf_counter()
                    with PeakMemory(dev) as pm:
                        m.generate(prompt[:, -1:], new_tokens, top_k=1, state=st)
                    rows.append({"item": "generate", "impl": "ours",
                                 "shape": f"prompt {P}, {new_tokens} new",
                                 "ms": pm.seconds * 1e3 / new_tokens,
                                 "tok/s": new_tokens / pm.seconds, "peak GB": pm.peak / 1e9,
                                 "note": f"prompt prefill {1e3 * (t1 - t0):.0f} ms"})
                run_item(rows, "generate", "ours", gen)
            del m
            if off is not None:
                mo = official().to(dt).eval()

                def off_gen():
                    prompt = torch.randint(0, 256, (1, prompts[0]), device=dev)
                    n = 4
                    with PeakMemory(dev) as pm:
                        mo.generate(prompt, n, top_k=1)
                    rows.append({"item": "generate", "impl": "official",
                                 "shape": f"prompt {prompts[0]}, {n} new",
                                 "ms": pm.seconds * 1e3 / n, "tok/s": n / pm.seconds,
                                 "peak GB": pm.peak / 1e9, "note": "re-runs the prefix"})
                run_item(rows, "generate", "official", off_gen)

    cols = ["item", "impl", "shape", "ms", "tok/s", "peak GB", "note"]
    md = markdown_table(rows, cols)
    out = Path(a.out)
    write_json(out / "bench_bdh.json", {"meta": run_meta(dev, official=bool(off)), "rows": rows})
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_bdh.md").write_text(md + "\n")
    print(md)
    return rows


if __name__ == "__main__":
    main()

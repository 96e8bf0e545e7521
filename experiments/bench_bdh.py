"""BDH end-to-end benchmarks against the official model, in one process.

    python -m experiments.bench_bdh [--official-bdh DIR] [--items train,prefill,generate]
                                    [--out DIR] [--no-compile] [--reps N]

* train:    one training step at the official preset (B32, T512, bf16 autocast, AdamW lr 1e-3,
            wd 0.1; forward + backward + step): tokens/s (median of timed steps) and peak memory;
            ours eager and compiled, the official model eager and compiled.
* prefill:  batch 1, no grad, weights in bf16: ms and peak memory of one forward of T = 4096,
            8192 and 16384 tokens (ours; memory must grow linearly) and of T = 16384 (official);
            then ours streaming 65,536, 262,144 and 1,048,576 tokens in 16,384-token chunks
            (memory must stay flat).
* sparse:   dense against sparse decoding (`experiments.bench_sparse`): tok/s at batch 1 after
            each prompt and at batch 1–64 after the first, with random weights and, given
            --checkpoint, a trained BDH; the density measured while decoding in each row's note.
* generate: batch 1, greedy: tokens/s of decoding 64 tokens after a 1k and a 100k-token prompt
            (ours: the prompt goes once through the chunked kernel, then the fixed-size state;
            the prompt's prefill time is in the note); the official `generate` after the 1k
            prompt (it re-runs the whole prefix per token, so only 4 tokens are timed).

Targets (issue 4), checked in the "meets" column on a GPU:
    train:    ours ≥ 131k tok/s (the official compiled anchor) with peak ≤ 32 GB
    prefill:  ours at T=16384 ≥ 5× the official forward's tok/s in this run (without
              --official-bdh: its 276 ms anchor, i.e. ≤ 55.2 ms)
    generate: ours ≥ 1,000 tok/s after both prompts
    sparse:   trained weights, batch 1, sparse decode ≥ 5,000 tok/s after both prompts (issue 15)

"vs official" is ours' tok/s over the official model's tok/s at the same item and shape, in the
same process (eager against eager, compiled against compiled). Peak memory is
torch.cuda.max_memory_allocated, reset before the timed calls, in GB = 1e9 bytes (the JSON has
bytes). Inputs are random token ids. Every item catches its own errors: an out-of-memory or a
failure becomes a row with a note, and the other items still run. The JSON is rewritten after
every row, so a killed run keeps what it measured.

`--official-bdh DIR` is a folder holding the official pathwaycom/bdh `bdh.py`; it is imported by
path at run time (never vendored), e.g. after
    mkdir -p .official       # git-ignored
    git -C /work/.mirror/pathwaycom+bdh/repo show HEAD:bdh.py > .official/bdh.py
On a CPU the same code paths run on a tiny config as a smoke test; timings need a GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .measure import PeakMemory, free_memory, is_oom
from .results import markdown_table, run_meta, write_json

ITEMS = ("train", "prefill", "generate", "sparse")
COLUMNS = ["item", "impl", "shape", "ms", "tok/s", "peak GB", "vs official", "target", "meets",
           "note"]
# Anchors measured on one H100 (DESIGN.md); used only where the official model is not loaded.
OFFICIAL_PREFILL_16K_MS = 276.0
TRAIN_TOKS_TARGET, TRAIN_PEAK_TARGET = 131e3, 32e9
PREFILL_SPEEDUP_TARGET, GENERATE_TOKS_TARGET = 5.0, 1000.0
SPARSE_TOKS_TARGET = 5000.0


@dataclass
class Sizes:
    model: dict = field(default_factory=dict)      # BDHConfig overrides, ours and official alike
    batch: int = 32
    seq: int = 512
    reps: int = 10                                  # timed training steps
    prefill: tuple = (4096, 8192, 16384)            # ours at each; the official at the last
    prefill_reps: int = 3
    stream: tuple = (1 << 16, 1 << 18, 1 << 20)
    stream_chunk: int = 16384
    prompts: tuple = (1024, 100_000)
    new_tokens: int = 256
    official_new_tokens: int = 4
    sparse_batches: tuple = (1, 4, 16, 64)          # at the first prompt; batch 1 at every prompt
    density_tokens: int = 16


GPU_SIZES = Sizes()
SMOKE_SIZES = Sizes(model=dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8),
                    batch=2, seq=64, reps=2, prefill=(128, 256), prefill_reps=2,
                    stream=(512, 1024), stream_chunk=256, prompts=(128, 300), new_tokens=4,
                    official_new_tokens=2, sparse_batches=(1, 2), density_tokens=2)


def load_official(folder: str | None):
    """The official bdh.py in ``folder``, imported by path (as module ``official_bdh``)."""
    if not folder:
        return None
    path = Path(folder) / "bdh.py"
    if not path.is_file():
        raise SystemExit(f"--official-bdh: expected a folder holding the official bdh.py, "
                         f"found no {path}")
    spec = importlib.util.spec_from_file_location("official_bdh", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod             # dataclasses and torch.compile look modules up here
    spec.loader.exec_module(mod)
    for name in ("BDH", "BDHConfig"):
        if not hasattr(mod, name):
            raise SystemExit(f"--official-bdh: {path} defines no {name}; expected the official "
                             f"pathwaycom/bdh bdh.py")
    return mod


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps: int, warmup: int = 1):
    """(median seconds of ``reps`` synchronised calls after ``warmup`` calls, peak bytes of the
    timed calls)."""
    for _ in range(warmup):
        fn()
    times = []
    with PeakMemory(dev) as m:
        for _ in range(reps):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), m.peak


def make_row(item, impl, shape, seconds=None, tokens=None, peak=None, note=None) -> dict:
    return {"item": item, "impl": impl, "shape": shape,
            "ms": None if seconds is None else 1e3 * seconds,
            "tok/s": None if seconds is None else tokens / seconds,
            "peak GB": None if peak is None else peak / 1e9, "peak_bytes": peak,
            "vs official": None, "target": None, "meets": None, "note": note}


class Bench:
    """Collects rows; every item runs under `run`, which turns its failure into a row."""

    def __init__(self, out: Path, meta: dict, dev: torch.device):
        self.out, self.meta, self.dev, self.rows = out, meta, dev, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()
        print(" | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                         for c in ("item", "impl", "shape", "ms", "tok/s", "peak GB")
                         if row[c] is not None), flush=True)

    def save(self) -> None:
        write_json(self.out / "bench_bdh.json", {"meta": self.meta, "rows": self.rows})

    def run(self, item: str, impl: str, shape: str, fn) -> None:
        try:
            fn()
        except Exception as exc:                                # noqa: BLE001 (a row, not a crash)
            if is_oom(exc):
                note = "out of memory"
            else:
                traceback.print_exc()
                note = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            self.add(make_row(item, impl, shape, note=note))
        finally:
            free_memory(self.dev)


# ----------------------------------------------------------------------------- items

def bench_train(b: Bench, impl: str, model, compiled: bool, sz: Sizes) -> None:
    dev = b.dev
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1,
                            fused=dev.type == "cuda")
    x = torch.randint(0, 256, (sz.batch, sz.seq), device=dev)
    y = torch.randint(0, 256, (sz.batch, sz.seq), device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        with autocast:
            _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                                  # compile / autotune, untimed
    sec, peak = timed(step, dev, sz.reps)
    b.add(make_row("train step", impl, f"B{sz.batch} T{sz.seq}", sec, sz.batch * sz.seq, peak))


def bench_prefill(b: Bench, impl: str, model, T: int, sz: Sizes) -> None:
    idx = torch.randint(0, 256, (1, T), device=b.dev)
    with torch.no_grad():
        sec, peak = timed(lambda: model(idx), b.dev, sz.prefill_reps)
    b.add(make_row("prefill", impl, f"B1 T{T}", sec, T, peak))


def bench_stream(b: Bench, model, L: int, sz: Sizes) -> None:
    """Ours consumes L tokens in chunks, carrying the state: memory must not grow with L."""
    chunk = min(sz.stream_chunk, L)
    with torch.no_grad():
        pieces = [torch.randint(0, 256, (1, chunk), device=b.dev) for _ in range(2)]
        _, st = model(pieces[0], state=None, return_state=True)    # warm-up: the first and a
        model(pieces[1], state=st, return_state=True)              # stateful chunk
        st = None
        with PeakMemory(b.dev) as pm:
            for i in range(L // chunk):
                _, st = model(pieces[i % 2], state=st, return_state=True)
            sync(b.dev)
    b.add(make_row("prefill stream", "ours", f"T{L} in {chunk}-token chunks", pm.seconds, L,
                   pm.peak, note=f"state {st.nbytes() / 2**20:.3g} MiB"))


def bench_generate_ours(b: Bench, model, P: int, sz: Sizes, cuda_graph: bool = True) -> None:
    """Greedy decoding after a P-token prompt; the timed call includes the graph capture."""
    dev = b.dev
    cuda_graph = cuda_graph and dev.type == "cuda"
    prompt = torch.randint(0, 256, (1, P), device=dev)
    model.generate(prompt[:, :16], 4, top_k=1, cuda_graph=cuda_graph)    # warm-up
    sync(dev)
    t0 = time.perf_counter()
    _, st = model.generate(prompt, 0, return_state=True)   # the state of all but the last token
    sync(dev)
    prefill_s = time.perf_counter() - t0
    with PeakMemory(dev) as pm:
        model.generate(prompt[:, -1:], sz.new_tokens, top_k=1, state=st, cuda_graph=cuda_graph)
    impl = "ours (eager decode)" if dev.type == "cuda" and not cuda_graph else "ours"
    b.add(make_row("generate", impl, f"prompt {P}, {sz.new_tokens} new", pm.seconds,
                   sz.new_tokens, pm.peak,
                   note=f"{'CUDA-graph' if cuda_graph else 'eager'} decode; prompt prefill "
                        f"{1e3 * prefill_s:.0f} ms; "
                        f"state {st.nbytes() / 2**20:.3g} MiB"))


def bench_generate_official(b: Bench, model, P: int, sz: Sizes) -> None:
    dev = b.dev
    prompt = torch.randint(0, 256, (1, P), device=dev)
    model.generate(prompt, 1, top_k=1)                                   # warm-up
    n = sz.official_new_tokens
    with PeakMemory(dev) as pm:
        model.generate(prompt, n, top_k=1)
    b.add(make_row("generate", "official", f"prompt {P}, {n} new", pm.seconds, n, pm.peak,
                   note="re-runs the whole prefix for every token"))


# ----------------------------------------------------------------------------- verdicts

def judge(rows: list[dict], gpu: bool) -> None:
    """Fill "vs official" (same item and shape, eager against eager, compiled against compiled)
    and, on a GPU, "target" / "meets"."""
    def find(item, impl, shape=None):
        for r in rows:
            if r["item"] == item and r["impl"] == impl and (shape is None or r["shape"] == shape) \
                    and r["tok/s"] is not None:
                return r
        return None

    for r in rows:
        if r["tok/s"] is None or not r["impl"].startswith("ours"):
            continue
        peer_impl = r["impl"].replace("ours", "official")
        peer = find(r["item"], peer_impl, None if r["item"] == "generate" else r["shape"])
        if r["item"] == "generate" and peer is not None \
                and r["shape"].split(",")[0] != peer["shape"].split(",")[0]:
            peer = None                                    # only the same prompt length
        if peer is not None:
            r["vs official"] = r["tok/s"] / peer["tok/s"]
        if not gpu:
            continue
        if r["item"] == "train step":
            r["target"] = (f">= {TRAIN_TOKS_TARGET / 1e3:.0f}k tok/s, "
                           f"<= {TRAIN_PEAK_TARGET / 1e9:.0f} GB")
            r["meets"] = r["tok/s"] >= TRAIN_TOKS_TARGET and r["peak_bytes"] <= TRAIN_PEAK_TARGET
        elif r["item"] == "prefill" and r["shape"] == "B1 T16384":
            if peer is not None:
                r["target"] = f">= {PREFILL_SPEEDUP_TARGET:g}x official (this run)"
                r["meets"] = r["vs official"] >= PREFILL_SPEEDUP_TARGET
            else:
                limit = OFFICIAL_PREFILL_16K_MS / PREFILL_SPEEDUP_TARGET
                r["target"] = f"<= {limit:.1f} ms (5x the official 276 ms anchor)"
                r["meets"] = r["ms"] <= limit
        elif r["item"] == "sparse decode" and "sparse" in r["impl"] \
                and r.get("weights") == "trained" and r.get("batch") == 1:
            r["target"] = f">= {SPARSE_TOKS_TARGET:.0f} tok/s (trained, batch 1)"
            r["meets"] = r["tok/s"] >= SPARSE_TOKS_TARGET
        elif r["item"] == "generate":
            r["target"] = f">= {GENERATE_TOKS_TARGET:.0f} tok/s"
            r["meets"] = r["tok/s"] >= GENERATE_TOKS_TARGET
    for r in rows:                       # sparse rows: speed over the dense row of the same run
        if r["item"] == "sparse decode" and "sparse" in r["impl"] and r["tok/s"] is not None:
            dense = [d for d in rows if d["item"] == r["item"] and d["shape"] == r["shape"]
                     and d.get("weights") == r.get("weights") and "dense" in d["impl"]
                     and d["tok/s"] is not None]
            if dense:
                r["note"] += f"; {r['tok/s'] / dense[0]['tok/s']:.2f}x dense"
    first_stream = find("prefill stream", "ours")
    for r in rows:
        if r["item"] == "prefill stream" and r["tok/s"] is not None and first_stream:
            r["note"] += (f"; peak {r['peak_bytes'] / first_stream['peak_bytes']:.4f}x "
                          f"the {first_stream['shape'].split()[0]} stream's")


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-bdh", default=None, metavar="DIR",
                   help="folder holding the official pathwaycom/bdh bdh.py (imported by path)")
    p.add_argument("--items", default=",".join(ITEMS), help="comma list of " + ", ".join(ITEMS))
    p.add_argument("--out", default="runs/bench_bdh")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile train steps")
    p.add_argument("--reps", type=int, default=None, help="timed training steps (GPU default 10)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="sparse item: also decode with this trained BDH (a checkpoint of "
                        "`python -m experiments.train --model bdh`; prompts from the corpus)")
    a = p.parse_args(argv)
    items = [i.strip() for i in a.items.split(",") if i.strip()]
    bad = [i for i in items if i not in ITEMS]
    if bad or not items:
        raise SystemExit(f"--items: expected a comma list of {', '.join(ITEMS)}, got {a.items!r}")
    if a.reps is not None and a.reps < 1:
        raise SystemExit(f"--reps: expected an int >= 1, got {a.reps}")
    off = load_official(a.official_bdh)
    from bdh import BDH, BDHConfig

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    sz = GPU_SIZES if gpu else SMOKE_SIZES
    if a.reps is not None:
        sz = Sizes(**{**asdict(sz), "reps": a.reps})
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        print("no GPU: a tiny smoke of the benchmark code paths; timings need a GPU")
    compile_ok = gpu and not a.no_compile          # CPU inductor needs a C++ toolchain: skip it
    dt = torch.bfloat16 if gpu else torch.float32
    official_sha = (hashlib.sha256((Path(a.official_bdh) / "bdh.py").read_bytes()).hexdigest()
                    if off else None)
    meta = run_meta(dev, official=bool(off), official_path=a.official_bdh,
                    official_sha256=official_sha, sizes=asdict(sz), items=items,
                    compile=compile_ok, inference_dtype=str(dt).replace("torch.", ""),
                    train_dtype="bf16 autocast, fp32 weights" if gpu else "float32",
                    smoke=not gpu,
                    notes=["peak GB = torch.cuda.max_memory_allocated / 1e9 over the timed calls "
                           "(on the CPU: process RSS, meaningless for this smoke)",
                           "vs official = ours tok/s / official tok/s, same process, item, shape",
                           "train: median of timed steps after one untimed (compile) step and one "
                           "warm-up step; allow_tf32 on for both models"])
    b = Bench(Path(a.out), meta, dev)
    b.save()

    def ours(**kw):
        torch.manual_seed(0)
        return BDH(BDHConfig(**sz.model, **kw)).to(dev)

    def official_in(dtype):
        """The official model with weights in ``dtype``; its RoPE buffer stays float32, as its
        forward asserts (it casts the rotated activations itself)."""
        mo = official().to(dtype).eval()
        freqs = getattr(getattr(mo, "attn", None), "freqs", None)
        if freqs is not None:
            freqs.data = freqs.data.float()
        return mo

    def official():
        torch.manual_seed(0)
        return off.BDH(off.BDHConfig(**sz.model)).to(dev)

    train_shape = f"B{sz.batch} T{sz.seq}"
    if "train" in items:
        variants = [("ours eager", ours, False)]
        variants += [("ours compiled", ours, True)] if compile_ok else []
        if off is not None:
            variants += [("official eager", official, False)]
            variants += [("official compiled", official, True)] if compile_ok else []
        for impl, make, compiled in variants:
            b.run("train step", impl, train_shape,
                  lambda: bench_train(b, impl, make().train(), compiled, sz))
            if compiled:
                torch._dynamo.reset()                   # drop the compiled graphs' memory

    if "prefill" in items:
        m = ours(dropout=0.0).to(dt).eval()
        for T in sz.prefill:
            b.run("prefill", "ours", f"B1 T{T}", lambda: bench_prefill(b, "ours", m, T, sz))
        if off is not None:
            mo = official_in(dt)
            T = sz.prefill[-1]
            b.run("prefill", "official", f"B1 T{T}", lambda: bench_prefill(b, "official", mo, T,
                                                                           sz))
            del mo
            free_memory(dev)
        for L in sz.stream:
            b.run("prefill stream", "ours", f"T{L}", lambda: bench_stream(b, m, L, sz))
        del m
        free_memory(dev)

    if "generate" in items:
        with torch.no_grad():
            m = ours(dropout=0.0).to(dt).eval()
            for P in sz.prompts:
                b.run("generate", "ours", f"prompt {P}", lambda: bench_generate_ours(b, m, P, sz))
                if gpu:
                    b.run("generate", "ours (eager decode)", f"prompt {P}",
                          lambda: bench_generate_ours(b, m, P, sz, cuda_graph=False))
            del m
            free_memory(dev)
            if off is not None:
                mo = official_in(dt)
                P = sz.prompts[0]
                b.run("generate", "official", f"prompt {P}",
                      lambda: bench_generate_official(b, mo, P, sz))
                del mo
                free_memory(dev)

    if "sparse" in items:
        from .bench_sparse import bench_sparse_decode, load_trained_bdh
        sets = [("random", lambda: ours(dropout=0.0).to(dt).eval(), None)]
        if a.checkpoint:
            model, info = load_trained_bdh(a.checkpoint, dev, dt)
            meta["checkpoint"] = info
            from .data import load_corpus
            sets.insert(0, ("trained", lambda: model, load_corpus("shakespeare")["val"]))
        for weights, make, text in sets:
            m = make()
            runs = [(P, 1) for P in sz.prompts] + [(sz.prompts[0], B) for B in sz.sparse_batches
                                                   if B != 1]
            for P, B in runs:
                b.run("sparse decode", "ours", f"B{B} prompt {P} ({weights})",
                      lambda: bench_sparse_decode(b, m, weights, P, B, sz.new_tokens,
                                                  sz.density_tokens, text,
                                                  profile=(P, B) == runs[0]))
            del m
            free_memory(dev)

    judge(b.rows, gpu)
    b.save()
    md = markdown_table(b.rows, COLUMNS)
    (Path(a.out) / "bench_bdh.md").write_text(
        f"BDH benchmark on {meta['device']}, commit {meta['commit']}, {meta['date']}\n\n{md}\n")
    print(md)
    if not gpu:
        print("(CPU smoke: these timings mean nothing; run on a GPU for the real numbers)")
    print(f"wrote {a.out}/bench_bdh.json and bench_bdh.md")
    return b.rows


if __name__ == "__main__":
    main()

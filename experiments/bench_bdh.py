"""BDH end-to-end benchmarks against the official model, in one process.

    python -m experiments.bench_bdh [--official-bdh DIR] [--items train,prefill,generate]
                                    [--out DIR] [--no-compile] [--reps N]

* train:    one training step at the official preset (B32, T512, bf16 autocast, AdamW lr 1e-3,
            wd 0.1; forward + backward + step): tokens/s (the median step through the harness's
            `time_call`) and peak memory (one more step); ours eager and compiled, the official
            model eager and compiled.
* prefill:  batch 1, no grad, weights in bf16: ms (median, `time_call`) and peak memory of one
            forward of T = 4096,
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

Targets, checked in the "meets" column on a GPU:
    train:    ours ≥ 131k tok/s (the official compiled anchor) with peak ≤ 32 GB
    prefill:  ours at T=16384 ≥ 5× the official forward's tok/s in this run (without
              --official-bdh: its 276 ms anchor, i.e. ≤ 55.2 ms)
    generate: ours ≥ 1,000 tok/s after both prompts
    sparse:   trained weights, batch 1, sparse decode ≥ 5,000 tok/s after both prompts

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
On a CPU the same code paths run on a tiny config as a smoke test (20 to 30 s, measured on a
2-core CPU shared with other work); timings need a GPU.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .harness import (POLICY, Flag, InDir, InFile, Int, Names, Optional, OutDir, PeakMemory,
                      Stopwatch, default_out, fail, free_memory, is_oom, markdown_table, option,
                      parse_config, run_meta, time_call, train_step, write_json, write_text)

ITEMS = ("train", "prefill", "generate", "sparse")
COLUMNS = ["item", "impl", "shape", "ms", "tok/s", "peak GB", "vs official", "target", "meets",
           "note"]
# Anchors measured on one H100; used only where the official model is not loaded.
OFFICIAL_PREFILL_16K_MS = 276.0
TRAIN_TOKS_TARGET, TRAIN_PEAK_TARGET = 131e3, 32e9
PREFILL_SPEEDUP_TARGET, GENERATE_TOKS_TARGET = 5.0, 1000.0
SPARSE_TOKS_TARGET = 5000.0


@dataclass
class Sizes:
    model: dict = field(default_factory=dict)      # BDHConfig overrides, ours and official alike
    batch: int = 32
    seq: int = 512
    prefill: tuple = (4096, 8192, 16384)            # ours at each; the official at the last
    stream: tuple = (1 << 16, 1 << 18, 1 << 20)
    stream_chunk: int = 16384
    prompts: tuple = (1024, 100_000)
    new_tokens: int = 256
    official_new_tokens: int = 4
    sparse_batches: tuple = (1, 4, 16, 64)          # at the first prompt; batch 1 at every prompt
    density_tokens: int = 16


GPU_SIZES = Sizes()
SMOKE_SIZES = Sizes(model=dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8),
                    batch=2, seq=64, prefill=(128, 256), stream=(512, 1024), stream_chunk=256,
                    prompts=(128, 300), new_tokens=4, official_new_tokens=2,
                    sparse_batches=(1, 2), density_tokens=2)


def check_checkpoint(path: str) -> None:
    """A readable BDH training checkpoint, or ValueError naming --checkpoint."""
    from bdh.checkpoint import read_bdh_checkpoint
    try:
        read_bdh_checkpoint(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--checkpoint: {exc}") from None


@dataclass
class BenchConfig:
    official_bdh: str | None = field(default=None, metadata=option(
        Optional(InDir(holding="bdh.py")), "folder holding the official pathwaycom/bdh bdh.py "
                                           "(imported by path)", shown="none: ours only"))
    items: tuple = field(default=ITEMS, metadata=option(
        Names(ITEMS), "comma list of the benchmarks to run"))
    out: str = field(default=default_out("bench_bdh"), metadata=option(
        OutDir(), "output folder"))
    no_compile: bool = field(default=False, metadata=option(
        Flag(), "skip the torch.compile train steps"))
    reps: int | None = field(default=None, metadata=option(
        Optional(Int(1)), "CPU: at least this many timed calls per train step and prefill",
        shown=f"the harness's {POLICY.min_reps}"))
    checkpoint: str | None = field(default=None, metadata=option(
        Optional(InFile()), "sparse item: also decode with this trained BDH (a checkpoint of "
                            "`python -m experiments.train --model bdh`; prompts from the "
                            "corpus)", shown="none: random weights only"))

    def check(self) -> None:
        if self.checkpoint is not None:
            check_checkpoint(self.checkpoint)

    def policy(self):
        return POLICY.with_min_reps(self.reps)


def load_official(folder: str | None):
    """The official bdh.py in ``folder`` (checked by the command line to exist), imported by
    path (as module ``official_bdh``); a file without its two classes stops the command."""
    if not folder:
        return None
    path = Path(folder) / "bdh.py"
    spec = importlib.util.spec_from_file_location("official_bdh", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod             # dataclasses and torch.compile look modules up here
    spec.loader.exec_module(mod)
    for name in ("BDH", "BDHConfig"):
        if not hasattr(mod, name):
            fail(f"--official-bdh: {path} defines no {name}; expected the official "
                 f"pathwaycom/bdh bdh.py")
    return mod


def timed(fn, dev, policy=POLICY):
    """(median seconds of ``fn`` through the harness, peak bytes of one more call)."""
    seconds = time_call(fn, dev, policy=policy).median_ms / 1e3
    with PeakMemory(dev) as m:
        fn()
    return seconds, m.peak


def make_row(item, impl, shape, seconds=None, tokens=None, peak=None, note=None) -> dict:
    return {"item": item, "impl": impl, "shape": shape,
            "ms": None if seconds is None else 1e3 * seconds,
            "tok/s": None if seconds is None else tokens / seconds,
            "peak GB": None if peak is None else peak / 1e9, "peak_bytes": peak,
            "vs official": None, "target": None, "meets": None, "note": note}


class Bench:
    """Collects rows; every item runs under `run`, which turns its failure into a row."""

    def __init__(self, out: Path, meta: dict, dev: torch.device, policy=POLICY):
        self.out, self.meta, self.dev, self.policy, self.rows = out, meta, dev, policy, []

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
    step = train_step(fwd, opt, x, y, autocast)
    step()                                                  # compile / autotune, untimed
    sec, peak = timed(step, dev, b.policy)
    b.add(make_row("train step", impl, f"B{sz.batch} T{sz.seq}", sec, sz.batch * sz.seq, peak))


def bench_prefill(b: Bench, impl: str, model, T: int, sz: Sizes) -> None:
    idx = torch.randint(0, 256, (1, T), device=b.dev)
    with torch.no_grad():
        sec, peak = timed(lambda: model(idx), b.dev, b.policy)
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
    b.add(make_row("prefill stream", "ours", f"T{L} in {chunk}-token chunks", pm.seconds, L,
                   pm.peak, note=f"state {st.nbytes() / 2**20:.3g} MiB"))


def bench_generate_ours(b: Bench, model, P: int, sz: Sizes, cuda_graph: bool = True) -> None:
    """Greedy decoding after a P-token prompt; the timed call includes the graph capture."""
    dev = b.dev
    cuda_graph = cuda_graph and dev.type == "cuda"
    prompt = torch.randint(0, 256, (1, P), device=dev)
    model.generate(prompt[:, :16], 4, top_k=1, cuda_graph=cuda_graph)    # warm-up
    with Stopwatch(dev) as prefill:
        _, st = model.generate(prompt, 0, return_state=True)   # all but the last token
    prefill_s = prefill.seconds
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

def parse(argv=None) -> BenchConfig:
    return parse_config(BenchConfig, {}, argv, prog="python -m experiments.bench_bdh",
                        description=__doc__.split("\n\n")[0])


def make_meta(cfg: BenchConfig, dev, sz: Sizes, compile_ok: bool) -> dict:
    gpu = dev.type == "cuda"
    official_sha = (hashlib.sha256((Path(cfg.official_bdh) / "bdh.py").read_bytes()).hexdigest()
                    if cfg.official_bdh else None)
    return run_meta(dev, official=bool(cfg.official_bdh), official_path=cfg.official_bdh,
                    official_sha256=official_sha, sizes=asdict(sz), items=list(cfg.items),
                    compile=compile_ok, inference_dtype="bfloat16" if gpu else "float32",
                    train_dtype="bf16 autocast, fp32 weights" if gpu else "float32",
                    smoke=not gpu,
                    notes=["peak GB = torch.cuda.max_memory_allocated / 1e9 over one call "
                           "after the timed ones (on the CPU: process RSS, meaningless for "
                           "this smoke)",
                           "vs official = ours tok/s / official tok/s, same process, item, shape",
                           "train and prefill: the median of the harness's time_call after one "
                           "untimed (compile) call; allow_tf32 on for both models"])


class Models:
    """Fresh models for the items: ours (``sz.model`` over BDHConfig) and, when loaded, the
    official one."""

    def __init__(self, sz: Sizes, dev, official_module):
        self.sz, self.dev, self.off = sz, dev, official_module
        self.dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def ours(self, **kw):
        from bdh import BDH, BDHConfig
        torch.manual_seed(0)
        return BDH(BDHConfig(**self.sz.model, **kw)).to(self.dev)

    def official(self):
        torch.manual_seed(0)
        return self.off.BDH(self.off.BDHConfig(**self.sz.model)).to(self.dev)

    def official_inference(self):
        """The official model with weights in the inference dtype; its RoPE buffer stays
        float32, as its forward asserts (it casts the rotated activations itself)."""
        mo = self.official().to(self.dtype).eval()
        freqs = getattr(getattr(mo, "attn", None), "freqs", None)
        if freqs is not None:
            freqs.data = freqs.data.float()
        return mo


def run_train(b: Bench, models: Models, compile_ok: bool) -> None:
    sz = models.sz
    variants = [("ours eager", models.ours, False)]
    variants += [("ours compiled", models.ours, True)] if compile_ok else []
    if models.off is not None:
        variants += [("official eager", models.official, False)]
        variants += [("official compiled", models.official, True)] if compile_ok else []
    for impl, make, compiled in variants:
        b.run("train step", impl, f"B{sz.batch} T{sz.seq}",
              lambda: bench_train(b, impl, make().train(), compiled, sz))
        if compiled:
            torch._dynamo.reset()                   # drop the compiled graphs' memory


def run_prefill(b: Bench, models: Models) -> None:
    sz = models.sz
    m = models.ours(dropout=0.0).to(models.dtype).eval()
    for T in sz.prefill:
        b.run("prefill", "ours", f"B1 T{T}", lambda: bench_prefill(b, "ours", m, T, sz))
    if models.off is not None:
        mo, T = models.official_inference(), sz.prefill[-1]
        b.run("prefill", "official", f"B1 T{T}", lambda: bench_prefill(b, "official", mo, T, sz))
        del mo
        free_memory(b.dev)
    for L in sz.stream:
        b.run("prefill stream", "ours", f"T{L}", lambda: bench_stream(b, m, L, sz))


def run_generate(b: Bench, models: Models) -> None:
    sz, gpu = models.sz, b.dev.type == "cuda"
    with torch.no_grad():
        m = models.ours(dropout=0.0).to(models.dtype).eval()
        for P in sz.prompts:
            b.run("generate", "ours", f"prompt {P}", lambda: bench_generate_ours(b, m, P, sz))
            if gpu:
                b.run("generate", "ours (eager decode)", f"prompt {P}",
                      lambda: bench_generate_ours(b, m, P, sz, cuda_graph=False))
        m = None
        free_memory(b.dev)
        if models.off is not None:
            mo, P = models.official_inference(), sz.prompts[0]
            b.run("generate", "official", f"prompt {P}",
                  lambda: bench_generate_official(b, mo, P, sz))


def run_sparse(b: Bench, models: Models, checkpoint: str | None) -> None:
    from .bench_sparse import bench_sparse_decode
    sz = models.sz
    sets = [("random", lambda: models.ours(dropout=0.0).to(models.dtype).eval(), None)]
    if checkpoint:
        from bdh import load_trained_bdh

        from .data import load_corpus
        model, b.meta["checkpoint"] = load_trained_bdh(checkpoint, b.dev, models.dtype)
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
        m = None
        free_memory(b.dev)


def main(argv=None) -> list[dict]:
    cfg = parse(argv)
    off = load_official(cfg.official_bdh)
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    sz = GPU_SIZES if gpu else SMOKE_SIZES
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        print("no GPU: a tiny smoke of the benchmark code paths; timings need a GPU")
    compile_ok = gpu and not cfg.no_compile        # CPU inductor needs a C++ toolchain: skip it
    b = Bench(Path(cfg.out), make_meta(cfg, dev, sz, compile_ok), dev, cfg.policy())
    b.save()
    models = Models(sz, dev, off)
    if "train" in cfg.items:
        run_train(b, models, compile_ok)
    if "prefill" in cfg.items:
        run_prefill(b, models)
    if "generate" in cfg.items:
        run_generate(b, models)
    if "sparse" in cfg.items:
        run_sparse(b, models, cfg.checkpoint)
    judge(b.rows, gpu)
    b.save()
    md = markdown_table(b.rows, COLUMNS)
    write_text(Path(cfg.out) / "bench_bdh.md", f"BDH benchmark on {b.meta['device']}, commit "
               f"{b.meta['commit']}, {b.meta['date']}\n\n{md}\n")
    print(md)
    if not gpu:
        print("(CPU smoke: these timings mean nothing; run on a GPU for the real numbers)")
    print(f"wrote {cfg.out}/bench_bdh.json and bench_bdh.md")
    return b.rows


if __name__ == "__main__":
    main()

"""Serving benchmark: many concurrent sessions, recurrent states against KV caches.

    python -m experiments.serve_bench [--preset cpu|h100] [--device cpu|cuda] [--models bdh,gpt2]
                                      [--sessions 1,8,64] [--contexts 1024,8192] [--steps N]
                                      [--resume-model small|full] [--out DIR]

Both models are served the same way: one process, `serve.engine.Engine` (continuous batching,
one state per session kept in memory, nothing written to disk while decoding). BDH keeps a
fixed-size state per session (`serve.models.BDHAdapter` on `bdh.decode.BDHDecoder`); GPT-2
(`baselines.GPT2LM`, transformers SDPA) keeps a KV cache per session (a DynamicCache, the plain
transformers way), batched across sessions at one position.

For each model, context L and session count N: one session reads L random bytes (timed:
prefill), N copies of it are made (`Engine.fork_session`; the state of a session after L tokens
has the same size and cost whatever the tokens), then the N sessions each generate --steps
tokens at once (greedy). Recorded: aggregate tokens/s (N·steps over the wall time of the
calls), p50/p99 time per decode step (each step gives every session one token), the state bytes
per session and in all, and on CUDA the peak memory of the decoding phase. A configuration that
runs out of memory is recorded with "oom" and ends that model's sweep at that context: the
session count at which the KV server fails.

Resume from disk: a BDH state after --resume-context tokens ("full": the default 25M BDH,
6 × 4 × 8192 × 256 float32 = 192 MiB) is saved by `serve.store` with each codec, dropped from
the page cache (posix_fadvise), and read back to the device; the time is compared with the time
the file's bytes take at the disk's read speed, measured on the same file (target: at most 1.5×).

Outputs (DIR: --out, default runs/serve_bench, gitignored): serve_bench.json, serve_bench.md
and serve_bench.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from glassbrain.atomic_file import payload_sha256
from serve.codec import CODECS
from serve.engine import Engine, EngineConfig, EngineError, SamplingParams, \
    step_ms_quantiles
from serve.models import BDHAdapter, ModelAdapter, human_bytes, kv_cache_bytes
from serve.store import SessionRecord, SessionStore

from .measure import free_memory, is_oom
from .results import (commit_label, default_out, markdown_table, run_meta, save_figure,
                      write_json, write_text)

MODELS = ("bdh", "gpt2")


@dataclasses.dataclass
class BenchConfig:
    preset: str = "cpu"
    device: str = "cpu"
    dtype: str = "float32"
    models: tuple = MODELS
    sessions: tuple = (1, 4, 16)
    contexts: tuple = (1024, 4096)
    steps: int = 8
    deadline_s: float = 45.0
    resume_model: str = "full"
    resume_context: int = 512
    out: str = default_out("serve_bench")
    bdh: dict = dataclasses.field(default_factory=dict)
    gpt2: dict = dataclasses.field(default_factory=dict)


PRESETS = {
    # Tiny models, a few sessions: about a minute on a laptop CPU (the resume measurement uses
    # the full-size BDH state all the same).
    "cpu": dict(device="cpu", dtype="float32", sessions=(1, 4, 16), contexts=(1024, 4096),
                steps=8, deadline_s=45.0,
                bdh=dict(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=16),
                gpt2=dict(n_layer=2, n_embd=96, n_head=3)),
    # The real sizes: the official 25M BDH against the GPT-2 124M shape (byte vocabulary).
    "h100": dict(device="cuda", dtype="bfloat16", sessions=(1, 8, 64, 256),
                 contexts=(1024, 8192, 32768, 100_000), steps=64, deadline_s=240.0,
                 resume_context=4096, bdh=dict(),
                 gpt2=dict(n_layer=12, n_embd=768, n_head=12)),
}


# ----------------------------------------------------------------------------- GPT-2 adapter

class GPT2Adapter(ModelAdapter):
    """`baselines.GPT2LM` for the engine: a session's state is its KV cache (a transformers
    DynamicCache), batched by concatenating the caches of sessions at one position."""
    kind = "gpt2"

    def new_state(self):
        from baselines import GPT2State
        return GPT2State(None, 0)

    def to_device(self, state, device):
        return self._rebuild([(k.to(device), v.to(device)) for k, v in self._kv(state)],
                             state.position)

    @staticmethod
    def _kv(state) -> list:
        return [(layer.keys, layer.values) for layer in state.cache.layers]

    @staticmethod
    def _rebuild(kv, position):
        from transformers import DynamicCache

        from baselines import GPT2State
        return GPT2State(DynamicCache(ddp_cache_data=kv), position)

    def stack(self, states):
        per_layer = zip(*(self._kv(s) for s in states))
        return self._rebuild([(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]))
                              for layer in per_layer], states[0].position)

    def clone(self, state):
        return self.split(state)[0]

    def split(self, batch):
        B = self._kv(batch)[0][0].shape[0]
        return [self._rebuild([(k[r:r + 1].clone(), v[r:r + 1].clone())
                               for k, v in self._kv(batch)], batch.position) for r in range(B)]


# ----------------------------------------------------------------------------- models

def _dtype(cfg: BenchConfig):
    return getattr(torch, cfg.dtype)


def build(name: str, cfg: BenchConfig) -> ModelAdapter:
    torch.manual_seed(0)
    if name == "bdh":
        from bdh import BDH, BDHConfig
        model = BDH(BDHConfig(**{**cfg.bdh, "dropout": 0.0}))
        model = model.to(cfg.device, _dtype(cfg))
        return BDHAdapter(model, "bdh", "auto")
    from baselines import GPT2LM, gpt2_config
    g = cfg.gpt2
    n_pos = max(cfg.contexts) + cfg.steps + 8
    model = GPT2LM(gpt2_config(g["n_layer"], g["n_embd"], g["n_head"], n_positions=n_pos,
                               dropout=0.0, attn_implementation="sdpa"))
    return GPT2Adapter(model.to(cfg.device, _dtype(cfg)), "gpt2")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- one sweep

def sweep(name: str, cfg: BenchConfig, deadline: float, emit) -> str | None:
    """Every (context, sessions) point of one model; returns why it stopped early, or None."""
    adapter = build(name, cfg)
    workdir = tempfile.mkdtemp(prefix="serve_bench_")
    eng = Engine(adapter, EngineConfig(
        state_dir=workdir, persist=False, observe=False, max_active=max(cfg.sessions),
        max_sessions=max(cfg.sessions) + 2, max_prompt_tokens=max(cfg.contexts) + 1,
        max_new_tokens=cfg.steps, prefill_chunk=4096)).start()
    rng = torch.Generator().manual_seed(0)
    try:
        for L in cfg.contexts:
            if time.time() > deadline:
                return f"deadline reached before context {L}"
            src = eng.create_session().id
            prompt = bytes(torch.randint(32, 127, (L,), generator=rng).tolist())
            _sync(cfg.device)
            t0 = time.perf_counter()
            try:
                eng.submit(src, prompt, SamplingParams(max_tokens=0)).result()
            except EngineError as exc:
                emit({"model": name, "context": L, "sessions": 1, "oom": True,
                      "error": exc.message[:200]})
                eng.delete_session(src)
                continue
            _sync(cfg.device)
            prefill_s = time.perf_counter() - t0
            if L == cfg.contexts[0]:          # compile and warm every kernel, untimed
                run_point(eng, name, src, L, min(cfg.sessions), cfg)
            for N in cfg.sessions:
                if time.time() > deadline:
                    return f"deadline reached at context {L}, {N} sessions"
                point = run_point(eng, name, src, L, N, cfg)
                point["prefill_s"] = round(prefill_s, 4)
                emit(point)
                if point["oom"]:
                    break
            eng.delete_session(src)
            free_memory(cfg.device)
    finally:
        eng.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
        del eng, adapter
        free_memory(cfg.device)
    return None


def run_point(eng: Engine, name: str, src: str, L: int, N: int, cfg: BenchConfig) -> dict:
    point = {"model": name, "context": L, "sessions": N, "oom": False}
    forks = []
    cuda = torch.device(cfg.device).type == "cuda"
    try:
        forks = [eng.fork_session(src).id for _ in range(N)]
        state = eng.cache.take(forks[0])
        eng.cache.put(forks[0], state)
        per = eng.adapter.state_nbytes(state)
        del state
        point.update(state_bytes_per_session=per, state_bytes_total=per * N,
                     kv_formula_bytes_gpt2_124m=kv_cache_bytes(L))
        if cuda:
            _sync(cfg.device)
            point["held_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        eng.stats.step_seconds.clear()
        t0 = time.perf_counter()
        calls = [eng.submit(s, b" ", SamplingParams(max_tokens=cfg.steps, temperature=0))
                 for s in forks]
        errors = []
        for c in calls:
            try:
                c.result()
            except EngineError as exc:
                errors.append(exc.message)
        wall = time.perf_counter() - t0
        if errors:
            raise RuntimeError(errors[0])
        p50, p99 = step_ms_quantiles(eng.stats.step_seconds)
        point.update(wall_s=round(wall, 4), tokens_per_s=round(N * cfg.steps / wall, 2),
                     step_ms_p50=p50, step_ms_p99=p99, steps_timed=len(eng.stats.step_seconds))
        if cuda:
            point["peak_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as exc:                                          # noqa: BLE001
        if not (is_oom(exc) or "out of memory" in str(exc).lower()):
            raise
        point.update(oom=True, error=str(exc).splitlines()[0][:200])
    finally:
        for s in forks:
            try:
                eng.delete_session(s)
            except EngineError:
                pass
        free_memory(cfg.device)
    return point


# ----------------------------------------------------------------------------- resume

def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_speed(path) -> float:
    """Bytes per second reading ``path`` after dropping it from the page cache."""
    _drop_page_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return os.path.getsize(path) / (time.perf_counter() - t0)


def resume_points(cfg: BenchConfig) -> list[dict]:
    """Save a BDH state with every codec, then read it back cold; see the module docstring."""
    from bdh import BDH, BDHConfig
    torch.manual_seed(0)
    fields = {} if cfg.resume_model == "full" else cfg.bdh
    adapter = BDHAdapter(BDH(BDHConfig(**{**fields, "dropout": 0.0})).to(cfg.device), "bdh")
    tokens = torch.randint(0, 256, (cfg.resume_context,))
    _, state = adapter.prefill(adapter.new_state(), tokens)
    rows = torch.cat([S.reshape(-1, S.shape[-1]) for S in state.layers])
    nonzero_rows = float((rows.view(torch.int32) != 0).any(1).float().mean())
    out = []
    root = Path(tempfile.mkdtemp(prefix="serve_resume_", dir=cfg.out))
    try:
        for codec in CODECS:
            store = SessionStore(root / codec, codec)
            rec = SessionRecord(id="0" * 32, created=0.0, last_active=0.0, model="bench",
                                tokens_seen=cfg.resume_context)
            t0 = time.perf_counter()
            size = store.save(rec, adapter.to_payload(state))
            save_s = time.perf_counter() - t0
            path = store.path(rec.id)
            speed = disk_read_speed(path)
            _drop_page_cache(path)
            _sync(cfg.device)
            t0 = time.perf_counter()
            _, payload = store.load(rec.id)
            back = adapter.from_payload(payload)
            _sync(cfg.device)
            load_s = time.perf_counter() - t0
            exact = all(torch.equal(a, b) for a, b in zip(back.layers, state.layers))
            read_s = size / speed
            _drop_page_cache(path)
            t0 = time.perf_counter()
            raw = torch.load(path, weights_only=True)
            unpickle_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            payload_sha256(raw["payload"])
            verify_s = time.perf_counter() - t0
            out.append({"codec": codec, "lossless": exact, "state_bytes": state.nbytes(),
                        "stored_bytes": size, "ratio": round(size / state.nbytes(), 4),
                        "save_s": round(save_s, 4), "resume_s": round(load_s, 4),
                        "disk_read_bytes_per_s": round(speed), "read_s": round(read_s, 4),
                        "resume_over_read": round(load_s / read_s, 2),
                        "torch_load_s": round(unpickle_s, 4), "sha256_s": round(verify_s, 4),
                        "context": cfg.resume_context, "nonzero_rows": round(nonzero_rows, 4)})
            store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- report

def tables(points, resume) -> str:
    rows = [{"model": p["model"], "context": p["context"], "sessions": p["sessions"],
             "tokens/s": p.get("tokens_per_s"), "step p50 ms": p.get("step_ms_p50"),
             "step p99 ms": p.get("step_ms_p99"),
             "state/session": human_bytes(p["state_bytes_per_session"])
             if "state_bytes_per_session" in p else None,
             "peak": human_bytes(p["peak_bytes"]) if "peak_bytes" in p else None,
             "oom": "OOM" if p["oom"] else ""} for p in points]
    res = [{"codec": r["codec"], "lossless": r["lossless"], "stored": human_bytes(
        r["stored_bytes"]), "of fp32": r["ratio"], "save s": r["save_s"],
            "resume s": r["resume_s"], "of which torch.load s": r["torch_load_s"],
            "sha256 s": r["sha256_s"], "disk read MB/s": r["disk_read_bytes_per_s"] / 1e6,
            "resume / read": r["resume_over_read"]} for r in resume]
    kv = [{"context": L, "BDH state (fp32)": human_bytes(resume[0]["state_bytes"]),
           "GPT-2 124M KV (bf16)": human_bytes(kv_cache_bytes(L))}
          for L in (1024, 4096, 16384, 65536, 100_000)] if resume else []
    return ("## Decoding\n\n" + markdown_table(rows) + "\n\n## Resume from disk\n\n"
            + markdown_table(res) + "\n\n## Bytes per session\n\n" + markdown_table(kv))


def plot(points, path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for (model, L) in sorted({(p["model"], p["context"]) for p in points}):
        ps = [p for p in points if p["model"] == model and p["context"] == L and not p["oom"]]
        if ps:
            ax[0].plot([p["sessions"] for p in ps], [p["tokens_per_s"] for p in ps],
                       "o-" if model == "bdh" else "s--", label=f"{model} @ {L}")
            ax[1].plot([p["sessions"] for p in ps], [p["state_bytes_total"] for p in ps],
                       "o-" if model == "bdh" else "s--", label=f"{model} @ {L}")
        for p in points:
            if p["model"] == model and p["context"] == L and p["oom"]:
                ax[0].axvline(p["sessions"], color="r", alpha=0.2)
    for a, t in zip(ax, ("aggregate tokens/s", "session state bytes (all sessions)")):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("concurrent sessions")
        a.set_title(t)
        a.legend(fontsize=7)
    fig.suptitle(f"serve_bench on {meta['device']} ({commit_label(meta)})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def _ints(text: str) -> tuple:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return vals


def _models(text: str) -> tuple:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names or any(m not in MODELS for m in names):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(MODELS)}, "
                                         f"got {text!r}")
    return names


def parse(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m experiments.serve_bench",
                                description=__doc__.split("\n\n")[0])
    late = argparse.SUPPRESS
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: tiny models, about a minute; h100: the real sizes (GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=late)
    p.add_argument("--models", type=_models, default=late, help="comma list of bdh, gpt2")
    p.add_argument("--sessions", type=_ints, default=late,
                   help="concurrent session counts (cpu: 1,4,16; h100: 1,8,64,256)")
    p.add_argument("--contexts", type=_ints, default=late,
                   help="contexts in tokens (cpu: 1024,4096; h100: 1024,8192,32768,100000)")
    p.add_argument("--steps", type=int, default=late, help="tokens each session generates")
    p.add_argument("--deadline-s", type=float, default=late,
                   help="stop starting new points after this many seconds per model")
    p.add_argument("--resume-model", choices=["small", "full"], default=late,
                   help="the BDH whose state the resume measurement stores: full = the "
                        "default 25M config (192 MiB state), small = the preset's")
    p.add_argument("--resume-context", type=int, default=late)
    p.add_argument("--out", default=default_out("serve_bench"),
                   help="output folder (gitignored by default)")
    a = p.parse_args(argv)
    cfg = BenchConfig(preset=a.preset, out=a.out, **PRESETS[a.preset])
    for name in ("device", "models", "sessions", "contexts", "steps", "deadline_s",
                 "resume_model", "resume_context"):
        if hasattr(a, name):
            setattr(cfg, name, getattr(a, name))
    if cfg.steps < 1 or cfg.resume_context < 1:
        raise SystemExit("--steps and --resume-context must be >= 1")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if cfg.device == "cpu" and cfg.dtype == "bfloat16":
        cfg.dtype = "float32"
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    meta = run_meta(cfg.device, config=dataclasses.asdict(cfg), stopped={},
                    notes=["one process per model: serve.engine.Engine, persist=False, "
                           "observe=False; BDH decodes with bdh.decode.BDHDecoder mode auto "
                           "(a CUDA graph per batch composition on CUDA, eager on the CPU)",
                           "N sessions are copies (forks) of one session that read L random "
                           "bytes: the decode cost of a fixed-size state does not depend on "
                           "its content; GPT-2's KV caches are real copies of L tokens each",
                           "GPT-2 batches sessions at one position (no padding); its cache is "
                           "a transformers DynamicCache (grows by concatenation)",
                           "tokens/s: N * steps / wall time of the N calls (admission "
                           "included); step ms: the engine's decode steps (one token for "
                           "every running session per step; the first step of a batch "
                           "builds it, and on CUDA captures its graph); one untimed point "
                           "per model first warms the kernels",
                           "memory-only engine (persist=False): a running session's "
                           "rollback copy waits in host memory; on the device it holds its "
                           "prefilled state until the batch is built, then its row of it",
                           "kv_formula_bytes_gpt2_124m: 2 x 12 layers x 768 x 2 bytes (bf16) "
                           "= 36,864 bytes per token of context",
                           "resume: store.load (torch.load weights_only, sha256 verification, "
                           "decoding, checks) + adapter.from_payload (to the device) after "
                           "posix_fadvise(DONTNEED) of the file; disk read speed measured on "
                           "the same file the same way; torch.load and sha256 also timed alone"])
    points: list[dict] = []

    def emit(p):
        points.append(p)
        print({k: p.get(k) for k in ("model", "context", "sessions", "tokens_per_s",
                                     "step_ms_p50", "oom")}, flush=True)
        write_json(out / "serve_bench.json", {"meta": meta, "points": points})

    for name in cfg.models:
        why = sweep(name, cfg, time.time() + cfg.deadline_s, emit)
        if why:
            meta["stopped"][name] = why
    resume = resume_points(cfg)
    meta["seconds"] = round(time.time() - t_start, 1)
    result = {"meta": meta, "points": points, "resume": resume}
    write_json(out / "serve_bench.json", result)
    md = tables(points, resume)
    write_text(out / "serve_bench.md", md + "\n\n" + "\n".join(f"- {n}" for n in meta["notes"])
               + "\n")
    try:
        plot(points, out / "serve_bench.png", meta)
    except Exception as exc:                                          # noqa: BLE001
        print(f"plotting failed ({type(exc).__name__}: {exc}); the JSON is complete")
    print(md)
    print(f"wrote {out}/serve_bench.json, .md, .png in {meta['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()

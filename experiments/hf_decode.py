"""How fast does a transformers model generate with the recurrent drop-ins ("hebbian", "bsbr"),
against SDPA, end to end through `model.generate`? One process, every point:

    prefill ms     generate(max_new_tokens=1): the prompt's forward and the first token
    ms/token       (generate(1 + n) - generate(1)) / n: the decode loop alone
    tok/s          batch · 1000 / ms/token
    stall ms       a prompt length never run before (context + --stall-offset, after the
                   context itself ran): its first generate(1 + n) minus its second
    peak MiB       CUDA peak allocated during generate(1 + n) (the process RSS on the CPU)
    captures       CUDA graphs the recurrent decoder holds after the point (one per batch
                   size: a new prompt length captures nothing)

Implementations (``--impls``):
    sdpa/dynamic    SDPA attention, transformers' default DynamicCache
    sdpa/static     SDPA, cache_implementation="static" + compile_config (torch.compile
                    "reduce-overhead": transformers' own compiled decode, the peer to beat)
    hebbian/eager   "hebbian" with the RecurrentCache, every decode step eager
    hebbian/graph   the same, each decode step replayed from a CUDA graph (the default of
                    `use_recurrent_cache`; on the CPU the decoder's slot step, eager)
    bsbr/eager, bsbr/graph   "bsbr" (chunk, top-k and bounded bank from the flags)

Models (``--models``): "gpt2" (12 layers, width 768, 12 heads: GPT-2 124M's shape) and
"llama" (16 layers, width 2048, 32 query and 8 key/value heads, MLP 8192: Llama 3.2 1B's
shape), both with a byte vocabulary and random weights (speed does not depend on them). A point
whose batch · context exceeds --batch-tokens is skipped; an implementation that runs out of
memory at a context is not tried at longer ones (SDPA stops where its KV cache does).

    python -m experiments.hf_decode                     # CPU smoke: tiny shapes, about a minute
    python -m experiments.hf_decode --preset h100       # the two shapes, 1k → 1M, batch 1/8/32
    python -m experiments.hf_decode --preset h100 --models gpt2 --impls hebbian/graph --append

--append adds the rows to an earlier run's JSON in --out (one sweep split over several
commands); --deadline-s stops starting new points after that many seconds (what ran is
written). JSON, Markdown and a PNG go to --out (runs/hf_decode).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .harness import (DECODE_POLICY, Device, Flag, Float, Int, Ints, Names, OutDir, PeakMemory,
                      default_out, free_memory, is_oom, markdown_table, option, parse_config,
                      run_meta, save_figure, time_call, torch_threads, validate, write_json,
                      write_text)

IMPLS = ("sdpa/dynamic", "sdpa/static", "hebbian/eager", "hebbian/graph", "bsbr/eager",
         "bsbr/graph")
MODELS = ("gpt2", "llama")
SHAPES = {   # (layers, width, heads, key/value heads, MLP width)
    "h100": {"gpt2": (12, 768, 12, 12, 3072), "llama": (16, 2048, 32, 8, 8192)},
    "cpu": {"gpt2": (2, 64, 4, 4, 256), "llama": (2, 64, 4, 2, 128)},
}
VOCAB = 256


def check_bank(spec) -> tuple:
    from bsbr import BankConfig
    return BankConfig(slots_per_level=tuple(spec)).slots_per_level


@dataclass
class HFDecodeConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu or cuda"))
    models: tuple = field(default=MODELS, metadata=option(Names(MODELS), "model shapes"))
    impls: tuple = field(default=("sdpa/dynamic", "hebbian/eager", "hebbian/graph",
                                  "bsbr/eager", "bsbr/graph"),
                         metadata=option(Names(IMPLS), "implementations"))
    contexts: tuple = field(default=(48, 100), metadata=option(Ints(2), "prompt lengths"))
    batches: tuple = field(default=(1, 4), metadata=option(Ints(1), "batch sizes"))
    batch_tokens: int = field(default=1 << 20, metadata=option(
        Int(1), "skip points whose batch · context exceeds this"))
    new_tokens: int = field(default=4, metadata=option(
        Int(1), "n: decoded tokens per timed generate(1 + n)"))
    reps: int = field(default=2, metadata=option(Int(1), "timed generate calls per number"))
    stall_offset: int = field(default=16, metadata=option(
        Int(1), "the new prompt length of the stall measurement is context + this"))
    chunk_size: int = field(default=16, metadata=option(Int(1, 256), "bsbr_chunk_size"))
    top_k: int = field(default=4, metadata=option(Int(1), "bsbr_top_k"))
    bank: tuple = field(default=(4, 2, 2), metadata=option(
        Ints(1), "bsbr_bank: slots per level of the bounded bank"))
    deadline_s: float = field(default=0.0, metadata=option(
        Float(0), "start no new point after this many seconds (0: no limit)"))
    append: bool = field(default=False, metadata=option(
        Flag(), "add the rows to the JSON already in --out"))
    out: str = field(default=default_out("hf_decode"), metadata=option(OutDir(),
                                                                        "output folder"))
    threads: int | None = 1
    seed: int = 0

    def check(self) -> None:
        try:
            check_bank(self.bank)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--bank: {exc}") from None
        if "sdpa/static" in self.impls and self.device == "cpu":
            raise ValueError("--impls: sdpa/static compiles with inductor, which this "
                             "experiment runs on CUDA only; drop it on the CPU")

    @property
    def shapes(self) -> dict:
        return SHAPES["h100" if self.device == "cuda" else "cpu"]


PRESETS = {
    "cpu": {},
    "h100": dict(device="cuda", impls=IMPLS,
                 contexts=(1024, 4096, 16384, 65536, 262144, 1048576), batches=(1, 8, 32),
                 batch_tokens=1 << 20, new_tokens=64, reps=3, chunk_size=256, top_k=8,
                 bank=(8, 4, 4), threads=None),
}


# ----------------------------------------------------------------------------- models

def build(cfg: HFDecodeConfig, name: str, impl: str):
    """A model of shape ``name`` (random weights, bf16 on CUDA) set up for ``impl``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    # importing bsbr registers attn_implementation "bsbr"
    import bsbr  # noqa: F401
    from glassbrain.hf import use_recurrent_cache
    torch.manual_seed(cfg.seed)
    layers, width, heads, kv_heads, mlp = cfg.shapes[name]
    positions = max(cfg.contexts) + cfg.stall_offset + cfg.new_tokens + 8
    special = dict(bos_token_id=0, eos_token_id=None, pad_token_id=0)
    if name == "gpt2":
        conf = GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=width, n_layer=layers,
                          n_head=heads, n_inner=mlp, **special)
        model = GPT2LMHeadModel(conf)
    else:
        conf = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=mlp,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, max_position_embeddings=positions,
                           **special)
        model = LlamaForCausalLM(conf)
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    model = model.to(cfg.device, dtype).eval()
    kind, how = impl.split("/")
    if kind != "sdpa":
        model.config.bsbr_chunk_size, model.config.bsbr_top_k = cfg.chunk_size, cfg.top_k
        model.config.bsbr_bank = list(cfg.bank)
        model.set_attn_implementation(kind)
        use_recurrent_cache(model, "eager" if how == "eager" else
                            ("auto" if cfg.device == "cuda" else "graph"))
    return model


def generate_call(model, impl: str, ids: torch.Tensor, new: int):
    """generate(ids, max_new_tokens=new), greedy, never stopping early."""
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if impl == "sdpa/static":
        from transformers import CompileConfig
        kw.update(cache_implementation="static", compile_config=CompileConfig())

    def call():
        with torch.no_grad():
            return model.generate(ids, **kw)
    return call


# ----------------------------------------------------------------------------- measuring

def measure_point(cfg: HFDecodeConfig, model, impl: str, batch: int, context: int) -> dict:
    """One (model, impl, batch, context) point: see the module docstring."""
    dev = torch.device(cfg.device)
    policy = dataclasses.replace(DECODE_POLICY, warmup=1, min_reps=cfg.reps,
                                 max_reps=cfg.reps, budget_s=0.0)
    n = cfg.new_tokens
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + context)
    ids = torch.randint(1, VOCAB, (batch, context), generator=g).to(dev)
    prefill = time_call(generate_call(model, impl, ids, 1), dev, policy=policy).median_ms
    full = time_call(generate_call(model, impl, ids, 1 + n), dev, policy=policy).median_ms
    with PeakMemory(dev) as mem:
        generate_call(model, impl, ids, 1 + n)()
    longer = torch.randint(1, VOCAB, (batch, context + cfg.stall_offset), generator=g).to(dev)
    first, second = (time_call(generate_call(model, impl, longer, 1 + n), dev,
                               policy=dataclasses.replace(policy, warmup=0, min_reps=1,
                                                          max_reps=1)).median_ms
                     for _ in range(2))
    ms = (full - prefill) / n
    decoder = getattr(model, "_recurrent_decoder", None)
    return {"prefill ms": prefill, "ms/token": ms,
            "tok/s": batch * 1e3 / ms if ms > 0 else None, "stall ms": first - second,
            "peak MiB": mem.peak / 2 ** 20,
            "captures": None if decoder is None else decoder.captures}


def run(cfg: HFDecodeConfig) -> dict:
    validate(cfg)
    with torch_threads(cfg.threads):
        return _run(cfg)


def _run(cfg: HFDecodeConfig) -> dict:
    start, rows = time.monotonic(), []
    for name in cfg.models:
        for impl in cfg.impls:
            model = build(cfg, name, impl)
            for batch in cfg.batches:
                for context in cfg.contexts:
                    row = {"model": name, "impl": impl, "batch": batch, "context": context}
                    if batch * context > cfg.batch_tokens:
                        continue
                    if cfg.deadline_s and time.monotonic() - start > cfg.deadline_s:
                        rows.append({**row, "note": "deadline"})
                        continue
                    try:
                        row.update(measure_point(cfg, model, impl, batch, context))
                        row["note"] = ""
                    except Exception as exc:                           # noqa: BLE001
                        if not is_oom(exc):
                            raise
                        row["note"] = "out of memory"
                    rows.append(row)
                    print(row, flush=True)
                    free_memory(cfg.device)
                    if row["note"]:
                        break                  # longer contexts would not fit either
            del model
            free_memory(cfg.device)
    return {"meta": run_meta(cfg.device, config=asdict(cfg)), "rows": rows}


# ----------------------------------------------------------------------------- output

COLUMNS = ["model", "impl", "batch", "context", "prefill ms", "ms/token", "tok/s", "stall ms",
           "peak MiB", "captures", "note"]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r.get("ms/token")]
    models = list(dict.fromkeys(r["model"] for r in result["rows"])) or ["-"]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False)
    batch = min((r["batch"] for r in rows), default=1)
    for col, name in enumerate(models):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["context"], r["ms/token"], r["prefill ms"]) for r in rows
                         if r["model"] == name and r["impl"] == impl and r["batch"] == batch)
            if pts:
                axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
                axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=impl)
        for row, what in enumerate(("ms per decoded token", "prefill ms")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(what)
            ax.set_title(f"{name}, batch {batch}", fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7)
    m = result["meta"]
    fig.suptitle(f"generate, {m.get('device')}, commit {m.get('commit') or 'unknown'}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def parse(argv=None) -> HFDecodeConfig:
    return parse_config(HFDecodeConfig, PRESETS, argv, prog="python -m experiments.hf_decode",
                        description=__doc__.split("\n")[0])


def main(argv=None) -> dict:
    cfg = parse(argv)
    result = run(cfg)
    out = Path(cfg.out)
    if cfg.append and (out / "hf_decode.json").exists():
        before = json.loads((out / "hf_decode.json").read_text())
        result["rows"] = before["rows"] + result["rows"]
        result["meta"]["appended_to"] = before["meta"]
    write_json(out / "hf_decode.json", result)
    md = markdown_table(result["rows"], COLUMNS) + "\n"
    write_text(out / "hf_decode.md", md)
    plot(result, out / "hf_decode.png")
    print(md)
    return result


if __name__ == "__main__":
    main()

"""Convert a trained GPT-2 to Hebbian and to BSBR attention, fine-tune briefly, compare.

    python -m experiments.convert_gpt2 [--preset cpu|h100] [--steps N] [--finetune-frac 0.1]
                                       [--chunk-size C] [--top-k K] [--contexts 256,1024,4096]
                                       [--out runs/convert_gpt2] [--device cpu|cuda]

1. Train a small byte-level `transformers.GPT2LMHeadModel` on the Shakespeare corpus (AdamW,
   the loop conventions of `experiments.train`).
2. Convert copies of it in place with `bsbr.convert.convert` to "hebbian" (elu+1 normalised
   linear attention) and "bsbr" (chunk-local softmax + routed chunk states). Weights are kept.
3. Fine-tune each converted copy for `finetune_frac` (≤ 10%) of the original's steps.
4. Report the validation loss of the original, of each conversion before and after the
   fine-tune, and the acceptance check (converted loss within 10% of the original's). A control
   row trains the original for the same extra steps: a small model is still improving, so
   "after fine-tune" is also compared with it.
5. Decode memory at long context: prefill each model with `context` tokens through the HF cache
   (pieces of at most `block_size` tokens) and record the bytes the cache holds: the original's
   KV cache grows with the context, Hebbian's state does not, BSBR's bank grows by one D×D slot
   per chunk. (Positions past the trained block reuse the trained position embeddings, tiled:
   this step measures memory only.)

Outputs in --out: convert_gpt2.json, convert_gpt2.md, convert_gpt2.png. The default CPU run
(a 2-layer byte GPT-2, 400 steps, one torch thread) takes about 30 s (measured on a 2-core CPU
shared with other work).
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Model

from glassbrain.hf import RecurrentCache, cache_nbytes
from bsbr.convert import convert

from .data import ByteBatcher, load_corpus
from .harness import (Device, Float, Int, Ints, Optional, OutDir, PeakMemory, default_out,
                      markdown_table, option, parse_config, run_meta, save_figure, threads_field,
                      torch_threads, write_json, write_text)

EVAL_SEED = 10_000
KINDS = ("hebbian", "bsbr")
# The model's cache argument: "cache" from transformers 5.2x, "past_key_values" before.
CACHE_KW = ("cache" if "cache" in inspect.signature(GPT2Model.forward).parameters
            else "past_key_values")


def check_bank(slots) -> None:
    from bsbr import BankConfig
    if slots is not None:
        try:
            BankConfig(slots_per_level=tuple(slots))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--bsbr-bank: {exc}") from None


@dataclass
class ConvertConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "where to train"))
    threads: int | None = threads_field()
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 128
    batch_size: int = 8
    steps: int = field(default=400, metadata=option(
        Int(1), "training steps of the original GPT-2"))
    lr: float = 3e-3
    finetune_frac: float = field(default=0.1, metadata=option(
        Float(0, 0.1, lo_open=True), "fine-tune steps after conversion, as a fraction of "
                                     "--steps"))
    finetune_lr: float = 1e-3
    weight_decay: float = 0.1
    eval_batches: int = 8
    chunk_size: int = field(default=16, metadata=option(
        Int(1), "BSBR chunk size (shorter than the block, so routing matters)"))
    top_k: int | None = field(default=None, metadata=option(
        Optional(Int(1)), "BSBR routed chunks per token", shown="all"))
    bsbr_bank: tuple | None = field(default=None, metadata=option(
        Optional(Ints(1)), "slots per level of the bounded BSBR bank, e.g. 8,4,4",
        shown="the exact, growing bank"))
    contexts: tuple = field(default=(256, 1024, 4096), metadata=option(
        Ints(1), "context lengths of the decode-memory table"))
    autocast: str = "none"            # "none" | "bfloat16" (CUDA)
    seed: int = 1337
    out: str = field(default=default_out("convert_gpt2"), metadata=option(
        OutDir(), "output folder"))

    def check(self) -> None:
        check_bank(self.bsbr_bank)


PRESETS = {
    "cpu": dict(threads=1),
    "h100": dict(device="cuda", n_layer=6, n_embd=384, n_head=6, block_size=512, batch_size=32,
                 steps=3000, lr=1e-3, finetune_lr=3e-4, eval_batches=16, chunk_size=64,
                 contexts=(1024, 8192, 65536), autocast="bfloat16"),
}


def build_gpt2(cfg: ConvertConfig) -> GPT2LMHeadModel:
    torch.manual_seed(cfg.seed)
    gcfg = GPT2Config(vocab_size=256, n_positions=cfg.block_size,
                      n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(gcfg).to(cfg.device)


def autocast_ctx(cfg: ConvertConfig):
    if cfg.autocast == "bfloat16" and torch.device(cfg.device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(model, x, y) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, val: bytes, cfg: ConvertConfig) -> float:
    """Mean loss over the same held-out batches every time (fixed seed)."""
    was = model.training
    model.eval()
    batches = ByteBatcher(val, cfg.block_size, cfg.batch_size, seed=EVAL_SEED, device=cfg.device)
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = batches.next()
        with autocast_ctx(cfg):
            total += float(lm_loss(model, x, y))
    model.train(was)
    return total / cfg.eval_batches


def train_steps(model, data: bytes, cfg: ConvertConfig, steps: int, lr: float, seed: int,
                desc: str) -> list[dict]:
    """A plain AdamW loop with a short linear warmup; returns the logged training losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    batches = ByteBatcher(data, cfg.block_size, cfg.batch_size, seed=seed, device=cfg.device)
    warmup = max(1, steps // 10)
    log = []
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        x, y = batches.next()
        with autocast_ctx(cfg):
            loss = lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"{desc}: loss is {value} at step {step}")
        log.append({"step": step + 1, "loss": value})
        bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return log


@torch.no_grad()
def decode_cache_bytes(model, context: int, cfg: ConvertConfig, text: bytes) -> dict:
    """Prefill ``context`` tokens through the HF cache in pieces, then decode one token; return
    the bytes the cache holds (and, on CUDA, the peak memory of that decode step)."""
    ids = torch.tensor(list(text[:context + 1]), dtype=torch.long, device=cfg.device)[None]
    if ids.shape[1] < context + 1:
        ids = ids.repeat(1, math.ceil((context + 1) / ids.shape[1]))[:, :context + 1]
    model.eval()
    # Converted models keep fixed-size states (what their `generate` uses); GPT-2 a KV cache.
    recurrent = model.config._attn_implementation in KINDS
    cache = RecurrentCache(model.config) if recurrent else DynamicCache(config=model.config)
    for a in range(0, context, cfg.block_size):
        piece = ids[:, a:min(a + cfg.block_size, context)]
        with autocast_ctx(cfg):
            model(input_ids=piece, use_cache=True, **{CACHE_KW: cache})
    with PeakMemory(cfg.device) as m, autocast_ctx(cfg):
        model(input_ids=ids[:, context:context + 1], use_cache=True, **{CACHE_KW: cache})
    row = {"context": context, "cache_bytes": cache_nbytes(cache)}
    if torch.device(cfg.device).type == "cuda":           # the CPU's RSS says nothing here
        row["decode_peak_bytes"] = m.peak
    return row


def extend_positions(model: GPT2LMHeadModel, n_positions: int) -> None:
    """Tile the trained position embeddings to ``n_positions`` rows, for the memory measurement
    past the trained block (the outputs there are not meant to be good)."""
    wpe = model.transformer.wpe
    trained = wpe.weight.shape[0]
    if n_positions <= trained:
        return
    rows = torch.arange(n_positions, device=wpe.weight.device) % trained
    new = torch.nn.Embedding(n_positions, wpe.weight.shape[1], device=wpe.weight.device,
                             dtype=wpe.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(wpe.weight[rows])
    model.transformer.wpe = new
    model.config.n_positions = n_positions


def convert_opts(kind: str, cfg: ConvertConfig) -> dict:
    if kind != "bsbr":
        return {}
    bank = None if cfg.bsbr_bank is None else list(cfg.bsbr_bank)
    return {"chunk_size": cfg.chunk_size, "top_k": cfg.top_k, "bank": bank}


def run(cfg: ConvertConfig, corpus: dict | None = None) -> dict:
    corpus = corpus if corpus is not None else load_corpus("shakespeare")
    with torch_threads(cfg.threads):
        return _run(cfg, corpus)


def _run(cfg: ConvertConfig, corpus: dict) -> dict:
    t0 = time.time()
    base = build_gpt2(cfg)
    params = sum(p.numel() for p in base.parameters())
    result = {"meta": run_meta(cfg.device, config=asdict(cfg), params=params),
              "losses": [], "train": {}, "memory": []}
    result["train"]["gpt2"] = train_steps(base, corpus["train"], cfg, cfg.steps, cfg.lr,
                                          cfg.seed, "train gpt2")
    base_loss = evaluate(base, corpus["val"], cfg)
    result["losses"].append({"model": "gpt2 (softmax)", "stage": "trained", "val_loss": base_loss,
                             "steps": cfg.steps})
    ft_steps = max(1, int(cfg.finetune_frac * cfg.steps))
    # Control: the original trained for the same extra steps, so a gain of the converted models
    # that is only "more training" shows up as such.
    control = copy.deepcopy(base)
    result["train"]["gpt2_control"] = train_steps(control, corpus["train"], cfg, ft_steps,
                                                  cfg.finetune_lr, cfg.seed + 1, "control gpt2")
    control_loss = evaluate(control, corpus["val"], cfg)
    result["losses"].append({"model": "gpt2 (softmax)", "stage": "fine-tuned (control)",
                             "val_loss": control_loss, "steps": ft_steps})
    del control
    models = {"gpt2": base}
    for kind in KINDS:
        model = convert(copy.deepcopy(base), kind, **convert_opts(kind, cfg))
        before = evaluate(model, corpus["val"], cfg)
        result["train"][kind] = train_steps(model, corpus["train"], cfg, ft_steps, cfg.finetune_lr,
                                            cfg.seed + 1, f"fine-tune {kind}")
        after = evaluate(model, corpus["val"], cfg)
        name = f"{kind}" + (f" (C={cfg.chunk_size}, top_k={cfg.top_k}"
                            f"{', bank ' + str(cfg.bsbr_bank) if cfg.bsbr_bank else ''})"
                            if kind == "bsbr" else
                            " (elu+1)")
        result["losses"] += [
            {"model": name, "stage": "converted", "val_loss": before, "steps": 0},
            {"model": name, "stage": "fine-tuned", "val_loss": after, "steps": ft_steps}]
        result.setdefault("acceptance", {})[kind] = {
            "ratio_to_original": after / base_loss, "within_10pct": after <= 1.10 * base_loss,
            "ratio_to_control": after / control_loss}
        models[kind] = model
    for model in models.values():
        extend_positions(model, max(cfg.contexts) + 1)     # + 1: the decoded token
    for context in tqdm(cfg.contexts, desc="decode memory"):
        for name, model in models.items():
            result["memory"].append({"model": name, **decode_cache_bytes(
                model, context, cfg, corpus["val"])})
    result["meta"]["seconds"] = time.time() - t0
    return result


def write_outputs(result: dict, out: Path) -> None:
    write_json(out / "convert_gpt2.json", result)
    meta = result["meta"]
    acc = result["acceptance"]
    lines = [
        "# GPT-2 → Hebbian / BSBR conversion", "",
        f"{meta['date']}, {meta['device']}, commit {meta['commit']}, "
        f"{meta['params']:,} parameters, {meta['seconds']:.0f} s.", "",
        "Validation loss (nats/byte) on fixed held-out batches:", "",
        markdown_table(result["losses"], ["model", "stage", "steps", "val_loss"]), "",
        "Acceptance (fine-tuned converted loss ≤ 1.10 × original): " + ", ".join(
            f"{k}: {v['ratio_to_original']:.3f}× ({'pass' if v['within_10pct'] else 'FAIL'})"
            for k, v in acc.items()) + ". Against the control (the original fine-tuned for the "
        "same steps): " + ", ".join(f"{k}: {v['ratio_to_control']:.3f}×" for k, v in acc.items())
        + ".", "",
        "Cache bytes after prefilling `context` tokens (batch 1):", "",
        markdown_table(result["memory"], [c for c in ("model", "context", "cache_bytes",
                                                      "decode_peak_bytes")
                                          if any(c in r for r in result["memory"])]),
    ]
    write_text(out / "convert_gpt2.md", "\n".join(lines) + "\n")
    plot(result, out / "convert_gpt2.png")


def plot(result: dict, path: Path) -> None:
    """Validation losses (bars) and the decode cache bytes against the context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model'].split(' ')[0]}\n{r['stage'].replace(' (', chr(10) + '(')}"
              for r in result["losses"]]
    vals = [r["val_loss"] for r in result["losses"]]
    ax1.bar(range(len(vals)), vals, color=["C0", "C0", "C1", "C1", "C2", "C2"][:len(vals)])
    for i, v in enumerate(vals):
        ax1.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax1.axhline(1.10 * vals[0], ls="--", color="gray", label="1.10 × original")
    ax1.set_xticks(range(len(vals)), labels, fontsize=8)
    ax1.set_ylabel("validation loss (nats/byte)")
    ax1.set_title("loss before / after conversion and fine-tune")
    ax1.legend(fontsize=8)
    for name in dict.fromkeys(r["model"] for r in result["memory"]):
        rows = [r for r in result["memory"] if r["model"] == name]
        ax2.plot([r["context"] for r in rows], [r["cache_bytes"] / 2**20 for r in rows], "o-",
                 label=name)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    contexts = sorted({r["context"] for r in result["memory"]})
    ax2.set_xticks(contexts, [str(c) for c in contexts])
    ax2.minorticks_off()
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("cache MiB (batch 1)")
    ax2.set_title("decode memory held by the HF cache")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def config_from_args(argv=None) -> ConvertConfig:
    return parse_config(ConvertConfig, PRESETS, argv, prog="python -m experiments.convert_gpt2",
                        description=__doc__.split("\n\n")[0])


def main(argv=None, corpus=None) -> dict:
    cfg = config_from_args(argv)
    result = run(cfg, corpus)
    out = Path(cfg.out)
    write_outputs(result, out)
    print((out / "convert_gpt2.md").read_text())
    print(f"wrote {out}/convert_gpt2.json, convert_gpt2.md, convert_gpt2.png")
    return result


if __name__ == "__main__":
    main()

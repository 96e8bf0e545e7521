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

Outputs in --out: convert_gpt2.json, convert_gpt2.md, convert_gpt2.png.
"""
from __future__ import annotations

import argparse
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
from .results import markdown_table, run_meta, write_json

EVAL_SEED = 10_000
KINDS = ("hebbian", "bsbr")
# The model's cache argument: "cache" from transformers 5.2x, "past_key_values" before.
CACHE_KW = ("cache" if "cache" in inspect.signature(GPT2Model.forward).parameters
            else "past_key_values")


@dataclass
class ConvertConfig:
    preset: str = "cpu"
    device: str = "cpu"
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 128
    batch_size: int = 8
    steps: int = 400
    lr: float = 3e-3
    finetune_frac: float = 0.1
    finetune_lr: float = 1e-3
    weight_decay: float = 0.1
    eval_batches: int = 8
    chunk_size: int = 16              # BSBR chunk (shorter than the block, so routing matters)
    top_k: int | None = None
    bsbr_bank: list | None = None     # None: the exact bank; e.g. [8, 4, 4]: the bounded one
    contexts: list = field(default_factory=lambda: [256, 1024, 4096])
    autocast: str = "none"            # "none" | "bfloat16" (CUDA)
    seed: int = 1337
    out: str = "runs/convert_gpt2"


PRESETS = {
    "cpu": dict(),
    "h100": dict(device="cuda", n_layer=6, n_embd=384, n_head=6, block_size=512, batch_size=32,
                 steps=3000, lr=1e-3, finetune_lr=3e-4, eval_batches=16, chunk_size=64,
                 contexts=[1024, 8192, 65536], autocast="bfloat16"),
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
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with autocast_ctx(cfg):
        model(input_ids=ids[:, context:context + 1], use_cache=True, **{CACHE_KW: cache})
    row = {"context": context, "cache_bytes": cache_nbytes(cache)}
    if cuda:
        row["decode_peak_bytes"] = torch.cuda.max_memory_allocated()
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
    return {"chunk_size": cfg.chunk_size, "top_k": cfg.top_k, "bank": cfg.bsbr_bank}


def run(cfg: ConvertConfig, corpus: dict | None = None) -> dict:
    corpus = corpus if corpus is not None else load_corpus("shakespeare")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
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
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "convert_gpt2.md").write_text("\n".join(lines) + "\n")
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
    fig.savefig(out / "convert_gpt2.png", dpi=110)
    plt.close(fig)


def config_from_args(argv=None) -> ConvertConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: a 2-layer byte GPT-2, about 30 s; h100: 6 layers, width 384")
    p.add_argument("--device", help="override the preset's device")
    p.add_argument("--steps", type=int, help="training steps of the original GPT-2 "
                   "(preset default)")
    p.add_argument("--finetune-frac", type=float,
                   help="fine-tune steps after conversion, as a fraction of --steps (<= 0.1)")
    p.add_argument("--chunk-size", type=int, help="BSBR chunk size (preset default)")
    p.add_argument("--top-k", type=int, help="BSBR routed chunks per token (default: all)")
    p.add_argument("--bsbr-bank", help="slots per level of the bounded BSBR bank, e.g. 8,4,4 "
                   "(default: the exact, growing bank)")
    p.add_argument("--contexts", help="comma-separated context lengths for the memory table")
    p.add_argument("--out", help="output folder (default runs/convert_gpt2)")
    a = p.parse_args(argv)
    cfg = ConvertConfig(preset=a.preset, **PRESETS[a.preset])
    for name in ("device", "steps", "finetune_frac", "chunk_size", "top_k", "out"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    try:
        if a.contexts:
            cfg.contexts = [int(c) for c in a.contexts.split(",")]
        if a.bsbr_bank:
            cfg.bsbr_bank = [int(c) for c in a.bsbr_bank.split(",")]
    except ValueError:
        raise SystemExit(f"--contexts / --bsbr-bank: expected comma-separated integers, got "
                         f"{a.contexts!r} / {a.bsbr_bank!r}")
    if not 0 < cfg.finetune_frac <= 0.1:
        raise SystemExit(f"--finetune-frac: expected a fraction in (0, 0.1], "
                         f"got {cfg.finetune_frac}")
    if cfg.steps < 1:
        raise SystemExit(f"--steps: expected >= 1, got {cfg.steps}")
    return cfg


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

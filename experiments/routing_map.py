"""What BSBR's memory reads: one MQAR example, the chunks each query routes to, beside softmax.

    python -m experiments.routing_map                 # CPU: trains two tiny models, ~a minute
    python -m experiments.routing_map \
        --bsbr-checkpoint runs/bsbr_ablation/chunk32/bsbr/ckpt/state.pt \
        --softmax-checkpoint runs/long_range/softmax/ckpt/state.pt

Without checkpoints a BSBR and a softmax `baselines.MixerLM` are trained on MQAR first, through
`experiments.long_range` (its `run_mixer`, under OUT/train/); a checkpoint is any long_range one
(OUT/<mixer>/ckpt/state.pt, also `experiments.bsbr_ablation`'s OUT/chunk<C>/bsbr/...). One
fresh MQAR sequence (--length tokens, --pairs key-value pairs) goes through both. For each
layer (one row of the figure):

* BSBR routing: query × chunk, the routing weight each query (an answer position, where the
  key is asked again) gives each completed chunk, from `kernels.bsbr.bsbr_attention(...,
  return_slot_weights=True)` called per query with the earlier chunks' states as its bank; a
  box marks the chunk holding the answer (the value token; its features carry the key through
  the short convolution), a dot the chunk routed to most;
* softmax: the attention of the same queries over every earlier position, a box on the value;
* the bank: the same sequence streamed in pieces of one chunk through a bounded bank
  (--bank slots per level): each slot's level, chunk count and salience (the routing weight it
  received, decayed) per head.

Each title gives the mean weight on the answer's chunk (against the share a uniform read would
give it) and how often that chunk is the heaviest, over the queries whose answer lies in an
earlier chunk with at least two to choose from. The head shown per layer is the one with the
most weight on the answer (--head to choose). Writes OUT/routing_map.png and
OUT/routing_map.json (the weights and hits).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from baselines.rope import apply_rope
from kernels import bsbr as kb

from . import long_range as lr
from . import tasks as T
from .bsbr_ablation import load_long_range_model, streamed, with_bank
from .harness import (Device, Float, InFile, Int, Ints, Optional, OutDir, default_out,
                      option, parse_config, run_meta, save_figure, threads_field,
                      torch_threads, write_json)

MIXERS = ("bsbr", "softmax")


@dataclass
class RoutingMapConfig:
    preset: str = "cpu"
    device: str = field(default="cpu", metadata=option(Device(), "cpu, cuda or cuda:i"))
    threads: int | None = threads_field()
    bsbr_checkpoint: str | None = field(default=None, metadata=option(
        Optional(InFile()), "a long_range checkpoint of a bsbr mixer", shown="train one"))
    softmax_checkpoint: str | None = field(default=None, metadata=option(
        Optional(InFile()), "a long_range checkpoint of a softmax mixer", shown="train one"))
    vocab: int = field(default=256, metadata=option(Int(8), "vocabulary (training only)"))
    d_model: int = field(default=32, metadata=option(Int(1), "width (training only)"))
    n_layer: int = field(default=2, metadata=option(Int(1), "blocks (training only)"))
    n_head: int = field(default=2, metadata=option(Int(1), "heads (training only)"))
    chunk: int = field(default=16, metadata=option(Int(1), "BSBR chunk (training only)"))
    steps: int = field(default=120, metadata=option(
        Int(1), "MQAR training steps per model (training only)"))
    batch_size: int = field(default=16, metadata=option(Int(1), "training batch"))
    lr: float = field(default=3e-3, metadata=option(Float(0), "AdamW learning rate"))
    seed: int = field(default=0, metadata=option(Int(0), "training seed"))
    length: int = field(default=256, metadata=option(Int(8), "tokens of the example"))
    pairs: int = field(default=32, metadata=option(Int(1), "key-value pairs of the example"))
    example: int = field(default=0, metadata=option(Int(0), "seed of the example"))
    bank: tuple = field(default=(2, 2, 1), metadata=option(
        Ints(1), "slots per level of the bounded bank streamed for the bank panel"))
    head: int | None = field(default=None, metadata=option(
        Optional(Int(0)), "the head shown in every layer", shown="per layer, the one whose "
                                                                 "routing finds the answer most"))
    out: str = field(default=default_out("routing_map"), metadata=option(
        OutDir(), "output folder"))

    def check(self) -> None:
        from bsbr import BankConfig
        try:
            BankConfig(slots_per_level=self.bank)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--bank: {exc}") from None
        vocab, heads = self.vocab, [self.n_head]
        for mixer in MIXERS:
            path = getattr(self, f"{mixer}_checkpoint")
            if path is None:
                lr_cfg = training_config(self, mixer)
                from .harness import validate
                validate(lr_cfg)
                continue
            _, lcfg, got = load_long_range_model(path, "cpu")
            if got != mixer:
                raise ValueError(f"--{mixer}-checkpoint: expected a checkpoint of the {mixer} "
                                 f"mixer, got one of {got!r} ({path})")
            vocab = min(vocab, lcfg.vocab) if mixer == "bsbr" else vocab
            heads.append(lcfg.n_head)
        top = T.get_task("mqar").max_difficulty(self.length, vocab)
        if self.pairs > top:
            raise ValueError(f"--pairs: MQAR at --length {self.length} with vocab {vocab} holds "
                             f"at most {top} pairs, got {self.pairs}")
        if self.head is not None and self.head >= min(heads):
            raise ValueError(f"--head: the models have {min(heads)} heads, got {self.head}")


PRESETS = {
    "cpu": dict(threads=1),
    "h100": dict(device="cuda", vocab=8192, d_model=128, chunk=64, steps=2000, batch_size=256,
                 lr=1e-3, length=1024, pairs=64, bank=(4, 2, 2)),
}


def config_from_args(argv=None) -> RoutingMapConfig:
    return parse_config(RoutingMapConfig, PRESETS, argv, prog="python -m experiments.routing_map",
                        description=__doc__.split("\n\n")[0])


def training_config(cfg: RoutingMapConfig, mixer: str) -> lr.LongRangeConfig:
    return lr.LongRangeConfig(
        preset=cfg.preset, device=cfg.device, threads=cfg.threads, mixers=(mixer,),
        curriculum="mqar", eval_tasks=("mqar",), eval_lengths=(cfg.length,), vocab=cfg.vocab,
        d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, chunk=cfg.chunk,
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
        log_every=max(1, cfg.steps // 20), out=str(Path(cfg.out) / "train"))


def get_model(cfg: RoutingMapConfig, mixer: str):
    """The mixer's model: from its checkpoint, or trained now."""
    path = getattr(cfg, f"{mixer}_checkpoint")
    if path is None:
        lcfg = training_config(cfg, mixer)
        lr.run_mixer(lcfg, mixer, None)
        path = lr.checkpoint_path(lcfg, mixer)
    return load_long_range_model(path, cfg.device)[0]


# ----------------------------------------------------------------------------- the example

def example(cfg: RoutingMapConfig, vocab: int):
    """(x [1,T], queries: the answer positions, answer: the value token's position per query,
    the model's targets there)."""
    x, y, m = T.make("mqar", 1, cfg.length, cfg.pairs, vocab, seed=cfg.example)
    queries = torch.nonzero(m[0]).flatten()
    answer = torch.tensor([int(torch.nonzero(x[0, :t] == x[0, t])[0]) + 1 for t in queries])
    return x.to(cfg.device), queries, answer, y[0, queries]


@torch.no_grad()
def mixer_inputs(model, x) -> list[torch.Tensor]:
    """Each block's mixer input [B,T,D] (after its LayerNorm and short convolution)."""
    seen = []
    hooks = [blk.mixer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for blk in model.blocks]
    try:
        logits, _ = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def split(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = t.shape
    return t.view(B, T, heads, D // heads).transpose(1, 2)            # [B,H,T,·]


@torch.no_grad()
def routing_weights(attn, h: torch.Tensor, queries) -> torch.Tensor:
    """[H, queries, chunks]: the routing weight of each query over the completed chunks before
    its own (0 elsewhere), one `bsbr_attention` call per query with the earlier chunks' states
    passed as its bank."""
    H, C = attn.n_head, attn.chunk_size
    q, k, v = (split(W(h), H) for W in (attn.W_q, attn.W_k, attn.W_v))
    r, hk = split(attn.W_r(h), H), split(attn.W_h(h), H)
    F, hh = kb.chunk_states(k, v, hk, chunk_size=C)
    w = torch.zeros(H, len(queries), F.shape[2])
    for i, t in enumerate(queries.tolist()):
        c, s = t // C, (t // C) * C
        if c == 0:
            continue
        one = slice(t, t + 1)
        _, sw = kb.bsbr_attention(q[:, :, one], k[:, :, s:t + 1], v[:, :, s:t + 1], r[:, :, one],
                                  hk[:, :, s:t + 1], chunk_size=C, top_k=attn.top_k,
                                  scale=attn.scale, offset=t - s, bank_F=F[:, :, :c],
                                  bank_h=hh[:, :, :c], return_slot_weights=True,
                                  long_scale=attn.long_scale)
        w[:, i, :c] = sw[0].float().cpu()
    return w


@torch.no_grad()
def softmax_weights(attn, h: torch.Tensor, queries) -> torch.Tensor:
    """[H, queries, T]: causal softmax attention of each query over the positions."""
    q, k, _ = attn.qkv(h)
    if attn.rope:
        q, k = apply_rope(q, 0, attn.rope_theta), apply_rope(k, 0, attn.rope_theta)
    T_ = h.shape[1]
    s = (q[0] @ k[0].mT) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(T_, T_, dtype=torch.bool, device=h.device).triu(1), -torch.inf)
    return s.softmax(-1)[:, queries].float().cpu()


def found(w: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict:
    """Per head, over the valid queries: "found", the share whose target column is heavier than
    every other by 1e-3 (a tie, as uniform weights give, is not found), and "mass", the mean
    weight of the target column."""
    Q = w.shape[1]
    at = w[:, torch.arange(Q), target]                                        # [H, Q]
    others = w.clone()
    others[:, torch.arange(Q), target] = -1.0
    hit = (at > others.amax(-1) + 1e-3) & valid
    n = max(1, int(valid.sum()))
    return {"found": [float(hit[hd].sum()) / n for hd in range(w.shape[0])],
            "mass": [float((at[hd] * valid).sum()) / n for hd in range(w.shape[0])]}


def uniform_mass(queries, answer, chunk: int, valid) -> dict:
    """The target column's mean weight were every candidate read alike: 1/c for BSBR's routing
    (c earlier chunks), the chunk's share of the t + 1 visible positions for softmax."""
    n = max(1, int(valid.sum()))
    c = (queries // chunk).double()
    ends = torch.minimum((answer // chunk + 1) * chunk, queries + 1).double()
    size = ends - (answer // chunk * chunk).double()
    return {"bsbr": float(((1 / c.clamp(min=1)) * valid).sum()) / n,
            "softmax": float((size / (queries + 1).double() * valid).sum()) / n}


def per_chunk(w: torch.Tensor, chunk: int) -> torch.Tensor:
    """[H, Q, T] position weights summed per chunk: [H, Q, ceil(T/chunk)]."""
    H, Q, T_ = w.shape
    n = -(-T_ // chunk)
    return torch.nn.functional.pad(w, (0, n * chunk - T_)).view(H, Q, n, chunk).sum(-1)


# ----------------------------------------------------------------------------- the figure

def _summary(f: dict, head: int, uniform: float) -> str:
    return (f"on the answer's chunk: {f['mass'][head]:.2f} (uniform {uniform:.2f}); "
            f"heaviest {100 * f['found'][head]:.0f}%")


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    layers = data["layers"]
    C, Q = data["chunk"], len(data["queries"])
    ans_chunk = [a // C for a in data["answer"]]
    uni = data["uniform_mass"]
    fig, axes = plt.subplots(len(layers), 3, figsize=(17, 0.9 + (1.6 + 0.16 * Q) * len(layers)),
                             squeeze=False, gridspec_kw={"width_ratios": [1.3, 2.2, 1.2]})
    ylab = [f"t={t}" + ("" if ok else " *") for t, ok in zip(data["queries"], data["scored"])]
    for (a, b, c), L in zip(axes, layers):
        hd, sh = L["head"], L["softmax_head"]
        w = np.asarray(L["routing"][hd])
        im = a.imshow(w, aspect="auto", cmap="Blues", norm=PowerNorm(0.5, 0, 1),
                      interpolation="nearest")
        a.scatter(ans_chunk, range(Q), marker="s", s=60, facecolors="none", edgecolors="red",
                  lw=1.2, label="answer's chunk")
        rows = [i for i in range(Q) if w[i].sum() > 0]
        a.scatter(w[rows].argmax(-1), rows, marker=".", s=16, color="orange",
                  label="routed most")
        a.set_xlabel(f"chunk (C = {C})")
        a.set_title(f"BSBR layer {L['layer']}, head {hd}: routing\n"
                    f"{_summary(L['bsbr_found'], hd, uni['bsbr'])}", fontsize=9)
        a.set_xticks(range(w.shape[1]))
        a.set_yticks(range(Q), ylab, fontsize=6)
        a.legend(fontsize=6, loc="lower right")
        fig.colorbar(im, ax=a, fraction=0.04)
        sm = np.asarray(L["softmax"][sh])
        im = b.imshow(sm, aspect="auto", cmap="Greens", norm=PowerNorm(0.5, 0, 1),
                      interpolation="nearest")
        b.scatter(data["answer"], range(Q), marker="s", s=40, facecolors="none",
                  edgecolors="red", lw=1.1, label="answer (the value token)")
        for edge in range(C, sm.shape[1], C):
            b.axvline(edge - 0.5, color="grey", lw=0.4, alpha=0.5)
        b.set_xlabel("position (grey lines: BSBR's chunks)")
        b.set_title(f"softmax layer {L['layer']}, head {sh}: attention\n"
                    f"{_summary(L['softmax_found'], sh, uni['softmax'])}", fontsize=9)
        b.set_yticks(range(Q), ylab, fontsize=6)
        b.legend(fontsize=6, loc="lower right")
        fig.colorbar(im, ax=b, fraction=0.03)
        bank = L["bank"]
        sal = np.asarray(bank["salience"])                                 # [H, slots]
        width = 0.8 / sal.shape[0]
        for h_i in range(sal.shape[0]):
            c.bar([j + h_i * width for j in range(sal.shape[1])], sal[h_i], width=width,
                  label=f"head {h_i}", color=f"C{h_i}")
        names = [("archive" if lvl == len(data["bank_slots"]) else f"level {lvl}")
                 + f"\n{cnt} chunk" + ("s" if cnt > 1 else "")
                 for lvl, cnt in zip(bank["levels"], bank["counts"])]
        c.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=7)
        c.set_ylabel("salience (routing weight received, decayed)")
        c.set_title(f"bounded bank {'/'.join(map(str, data['bank_slots']))} after the "
                    f"sequence\n(slots oldest first)", fontsize=9)
        c.legend(fontsize=7)
        c.grid(alpha=0.3, axis="y")
    m = data["meta"]
    fig.suptitle(f"One MQAR example: T = {data['length']}, {data['pairs']} pairs, {Q} queries; "
                 f"answers right: BSBR {data['bsbr_right']}/{Q}, softmax "
                 f"{data['softmax_right']}/{Q}\n(* not scored: the answer is in the query's "
                 f"own chunk, or there is one chunk to choose from) · {m['device']}, commit "
                 f"{m['commit']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    cfg = config_from_args(argv)
    out = Path(cfg.out)
    with torch_threads(cfg.threads):
        models = {m: get_model(cfg, m) for m in MIXERS}
        vocab = min(mod.config.vocab_size for mod in models.values())
        x, queries, answer, targets = example(cfg, vocab)
        (hb, logits_b), (hs, logits_s) = (mixer_inputs(models[m], x) for m in MIXERS)
        attn0 = models["bsbr"].blocks[0].mixer
        C = attn0.chunk_size
        # the answer lies in an earlier chunk, and there is more than one to route to
        valid = ((answer // C) < (queries // C)) & (queries // C >= 2)
        slots = tuple(cfg.bank)
        _, state = streamed(with_bank(models["bsbr"], slots), x, C)
        layers = []
        for i, (blk_b, blk_s) in enumerate(zip(models["bsbr"].blocks, models["softmax"].blocks)):
            w = routing_weights(blk_b.mixer, hb[i], queries)
            s = softmax_weights(blk_s.mixer, hs[i], queries)
            f_b = found(w, answer // C, valid)
            f_s = found(per_chunk(s, C), answer // C, valid)
            bank = state.layers[i].mixer.bank
            layers.append({
                "layer": i, "routing": w.tolist(), "softmax": s.tolist(),
                "bsbr_found": f_b, "softmax_found": f_s,
                "head": cfg.head if cfg.head is not None else max(
                    range(len(f_b["mass"])), key=f_b["mass"].__getitem__),
                "softmax_head": max(range(len(f_s["mass"])), key=f_s["mass"].__getitem__),
                "bank": {"levels": list(bank.levels), "counts": list(bank.counts),
                         "salience": bank.valid()[2][0].float().cpu().tolist()}})
    right = {m: int((lg[0, queries].argmax(-1).cpu() == targets).sum())
             for m, lg in zip(MIXERS, (logits_b, logits_s))}
    data = {"meta": run_meta(cfg.device), "config": dataclasses.asdict(cfg),
            "length": cfg.length, "pairs": cfg.pairs, "chunk": C, "head": cfg.head,
            "bank_slots": list(slots), "queries": queries.tolist(), "answer": answer.tolist(),
            "scored": valid.tolist(), "uniform_mass": uniform_mass(queries, answer, C, valid),
            "bsbr_right": right["bsbr"],
            "softmax_right": right["softmax"], "layers": layers}
    write_json(out / "routing_map.json", data)
    plot(data, out / "routing_map.png")
    for L in layers:
        for m in MIXERS:
            f = L[f"{m}_found"]
            print(f"layer {L['layer']} {m}: weight on the answer's chunk "
                  + ", ".join(f"{v:.2f}" for v in f["mass"]) + " per head (uniform "
                  f"{data['uniform_mass'][m]:.2f}); heaviest for "
                  + ", ".join(f"{100 * v:.0f}%" for v in f["found"]))
    print(f"results: {out}/routing_map.png, routing_map.json")
    return data


if __name__ == "__main__":
    main()

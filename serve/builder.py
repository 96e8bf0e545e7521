"""The model a server runs: a training checkpoint, or a small model trained here in seconds.

* ``--checkpoint PATH``: a checkpoint of `python -m experiments.train` (a `save_checked` dict
  with the weights under "model" and the run's settings under "config"; a BSBR LM's config is
  in the log's metadata, "bsbr_config"), loaded with weights_only.
* otherwise a small model (`SMALL`) trained for ``train_steps`` AdamW steps on the text this
  package carries (corpus.txt, about 2.7 kB; a few seconds on a CPU, no download). The weights
  are cached under the state folder, so a restarted server runs exactly the same model and the
  sessions it kept continue bit-exactly.

A BSBR LM is always served with a bounded bank (``bank``, slots per level), whatever it was
trained with: the bank's policy has no weights, and only a bounded bank has a fixed-size state.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

import torch

from bdh import BDH, BDHConfig
from bdh.checkpoint import load_trained_bdh
from bsbr import BankConfig, BSBRLM, BSBRLMConfig
from glassbrain.atomic_file import load_checked, payload_sha256, save_checked

from .models import BDHAdapter, BSBRAdapter, ModelAdapter

KINDS = ("bdh", "bsbr")
CORPUS = Path(__file__).with_name("corpus.txt")
DEFAULT_BANK = (8, 4, 4)

SMALL = MappingProxyType({      # read-only: the model each kind builds when none is given
    "bdh": lambda bank: BDH(BDHConfig(n_layer=2, n_embd=64, n_head=2,
                                      mlp_internal_dim_multiplier=16, dropout=0.0)),
    "bsbr": lambda bank: BSBRLM(BSBRLMConfig(n_layer=2, d_model=64, n_head=2, chunk_size=16,
                                             top_k=4, bank=BankConfig(bank))),
})


@dataclasses.dataclass
class TrainSettings:
    steps: int = 150
    batch_size: int = 8
    block_size: int = 64
    lr: float = 3e-3
    seed: int = 1337


def train_small(model: torch.nn.Module, text: bytes, cfg: TrainSettings) -> torch.nn.Module:
    """``cfg.steps`` AdamW steps of next-byte prediction on random windows of ``text``."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    if data.numel() <= cfg.block_size + 1:
        raise ValueError(f"text: expected more than block_size + 1 = {cfg.block_size + 1} "
                         f"bytes, got {data.numel()}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    model.train()
    for _ in range(cfg.steps):
        start = torch.randint(0, data.numel() - cfg.block_size - 1, (cfg.batch_size,),
                              generator=g)
        idx = torch.stack([data[s:s + cfg.block_size] for s in start.tolist()])
        tgt = torch.stack([data[s + 1:s + 1 + cfg.block_size] for s in start.tolist()])
        _, loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def small_model(kind: str, cache_dir, train_steps: int, bank=DEFAULT_BANK,
                log=print) -> torch.nn.Module:
    """The small ``kind`` model, trained on the carried text; its weights are cached in
    ``cache_dir`` (one file per kind, bank and step count) and reused when present."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    torch.manual_seed(TrainSettings.seed)
    model = SMALL[kind](tuple(bank))
    path = Path(cache_dir) / f"small-{kind}-{train_steps}steps.pt"
    if path.exists():
        model.load_state_dict(load_checked(path, "cached model", map_location="cpu"))
        return model.eval()
    if train_steps > 0:
        log(f"training the small {kind} model for {train_steps} steps on {CORPUS.name} ...")
        train_small(model, CORPUS.read_bytes(), TrainSettings(steps=train_steps))
    save_checked(model.state_dict(), path)
    return model.eval()


def load_checkpoint(path, bank=DEFAULT_BANK) -> tuple[str, torch.nn.Module]:
    """(kind, model) from an `experiments.train` checkpoint of a BDH or BSBR LM."""
    saved = load_checked(path, "training checkpoint", map_location="cpu")
    config = saved.get("config") if isinstance(saved, dict) else None
    kind = config.get("model") if isinstance(config, dict) else None
    if kind == "bdh":
        return kind, load_trained_bdh(path)[0]
    if kind != "bsbr":
        raise ValueError(f"--checkpoint {path}: expected a BDH or BSBR checkpoint of "
                         f"experiments.train, got model {kind!r}")
    fields = saved.get("log", {}).get("meta", {}).get("bsbr_config")
    if not isinstance(fields, dict):
        raise ValueError(f"--checkpoint {path}: no bsbr_config in the run's metadata")
    model = BSBRLM(BSBRLMConfig(**{**fields, "dropout": 0.0, "bank": BankConfig(bank)}))
    model.load_state_dict(saved["model"])
    return kind, model.eval()


def build_adapter(kind: str = "bdh", *, checkpoint=None, device="cpu", cache_dir=".",
                  train_steps: int = TrainSettings.steps, bank=DEFAULT_BANK,
                  decode_mode: str = "eager", log=print) -> ModelAdapter:
    """The adapter of the served model, on ``device``; ``decode_mode`` is BDH's
    (`bdh.decode.BDHDecoder`: "eager" records the glass brain, "auto" captures CUDA graphs)."""
    if checkpoint is not None:
        kind, model = load_checkpoint(checkpoint, bank)
        name = f"{kind}:{Path(checkpoint).name}"
    else:
        model = small_model(kind, cache_dir, train_steps, bank, log)
        name = f"{kind}-small"
    model = model.to(device)
    if kind == "bdh":
        return BDHAdapter(model, name, decode_mode)
    return BSBRAdapter(model, name)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: a session's state is only ever resumed by the model that
    made it."""
    return payload_sha256({k: v.detach().cpu() for k, v in model.state_dict().items()})[:16]

"""Loading a trained BDH from a training checkpoint (``python -m experiments.train --model bdh``
writes them: a checksummed torch file of {"model": state dict, "config": {"model": "bdh",
"bdh": BDHConfig fields, ...}, "step", "log"})."""
from __future__ import annotations

from glassbrain.atomic_file import load_checked

from .config import BDHConfig
from .model import BDH

CHECKPOINT_FIX = "pass a checkpoint written by `python -m experiments.train --model bdh`"


def read_bdh_checkpoint(path) -> dict:
    """The checked content of a BDH training checkpoint (on the CPU). Raises the errors of
    `glassbrain.atomic_file.load_checked` for a missing or damaged file, and ValueError for a
    checkpoint of another model."""
    saved = load_checked(path, "training checkpoint", map_location="cpu", fix=CHECKPOINT_FIX)
    cfg = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(cfg, dict) or cfg.get("model") != "bdh" or "model" not in saved:
        raise ValueError(f"checkpoint: {path} is not a BDH training checkpoint; "
                         f"{CHECKPOINT_FIX}")
    return saved


def load_trained_bdh(path, device="cpu", dtype=None):
    """(model in eval mode with dropout 0, info) from a BDH training checkpoint; info holds the
    path, the step, the last validation loss and the BDHConfig fields."""
    saved = read_bdh_checkpoint(path)
    fields = saved["config"].get("bdh", {})
    model = BDH(BDHConfig(**{**fields, "dropout": 0.0}))
    model.load_state_dict(saved["model"])
    val = saved.get("log", {}).get("val") or [{}]
    info = {"checkpoint": str(path), "step": saved.get("step"),
            "val_loss": val[-1].get("loss"), "bdh": fields}
    return model.to(device, dtype).eval(), info

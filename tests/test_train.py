"""The training loop: learning, exact resume, atomic checkpoints, clear flag errors."""
import json

import pytest
import torch

from experiments import train as tr

TEXT = (b"the quick brown fox jumps over the lazy dog. " * 200)
CORPUS = {"train": TEXT, "val": TEXT[:3000], "test": TEXT[:3000]}
TINY = ["--steps", "24", "--batch-size", "4", "--block-size", "32", "--eval-every", "12",
        "--log-every", "1", "--eval-batches", "2"]


def _cfg(model, extra=()):
    cfg = tr.config_from_args(["--model", model, *TINY, *extra])
    cfg.bdh = dict(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1)
    return cfg


@pytest.mark.parametrize("model", ["bdh", "gpt2"])
def test_loss_drops_on_repeated_text(model):
    log = tr.train(_cfg(model), CORPUS)
    first, last = log["train"][0]["loss"], log["train"][-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert log["status"] == "finished" and [v["step"] for v in log["val"]] == [0, 12, 24]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("model", ["bdh", "gpt2"])
def test_resume_reproduces_the_loss_curve(tmp_path, model):
    full = tr.train(_cfg(model), CORPUS)
    losses = [r["loss"] for r in full["train"]]

    cfg = _cfg(model, ["--ckpt-dir", str(tmp_path), "--ckpt-every", "10"])

    def crash(step, _model, _log):
        if step == 15:
            raise Interrupt                         # dies between checkpoints, at step 15

    with pytest.raises(Interrupt):
        tr.train(cfg, CORPUS, hook=crash)
    cfg.resume = True
    resumed = tr.train(cfg, CORPUS)                 # continues from the step-10 checkpoint
    assert [r["step"] for r in resumed["train"]] == list(range(1, 25))
    assert [r["loss"] for r in resumed["train"]] == losses          # exactly, dropout included
    assert [v["loss"] for v in resumed["val"]] == [v["loss"] for v in full["val"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{model}.pt"]   # no temp files


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    cfg = _cfg("gpt2", ["--ckpt-dir", str(tmp_path), "--max-minutes", "0", "--out",
                        str(tmp_path / "out")])
    log = tr.train(cfg, CORPUS)
    assert log["status"] == "interrupted"
    saved = torch.load(tmp_path / "gpt2.pt", weights_only=False)
    assert saved["step"] == 0
    assert json.loads((tmp_path / "out" / "train_log.json").read_text())["status"] == \
        "interrupted"


def test_bad_flags_fail_clearly():
    with pytest.raises(SystemExit):
        tr.config_from_args(["--model", "mamba"])
    with pytest.raises(SystemExit, match="steps"):
        tr.config_from_args(["--steps", "0"])
    with pytest.raises(SystemExit, match="autocast"):
        tr.config_from_args(["--autocast", "fp8"])

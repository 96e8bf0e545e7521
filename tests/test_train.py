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
    with pytest.raises(SystemExit, match="ckpt-dir"):       # would silently resume nothing
        tr.config_from_args(["--resume"])
    with pytest.raises(SystemExit, match="ckpt-dir"):
        tr.config_from_args(["--max-minutes", "5"])
    with pytest.raises(SystemExit, match="--bdh.*n_layers"):
        tr.config_from_args(["--bdh", "n_layers=2"])
    with pytest.raises(SystemExit, match="--bdh.*n_layer"):
        tr.config_from_args(["--bdh", "n_layer=0"])
    with pytest.raises(SystemExit, match="device"):
        tr.config_from_args(["--device", "tpu"])


def test_bdh_flag_overrides_the_preset():
    cfg = tr.config_from_args(["--bdh", "n_layer=1, dropout=0.0,backend=torch"])
    assert cfg.bdh == dict(tr.PRESETS["cpu"]["bdh"], n_layer=1, dropout=0.0, backend="torch")
    assert tr.PRESETS["cpu"]["bdh"]["n_layer"] == 2                  # the preset is untouched
    h100 = tr.config_from_args(["--preset", "h100"])
    assert (h100.bdh, h100.batch_size, h100.block_size, h100.steps, h100.lr,
            h100.weight_decay, h100.autocast, h100.eval_every) == \
        ({}, 32, 512, 3000, 1e-3, 0.1, "bfloat16", 250)


def test_bdh_eval_logs_densities():
    log = tr.train(_cfg("bdh", ["--steps", "2", "--eval-every", "2"]), CORPUS)
    for v in log["val"]:
        assert len(v["densities"]) == 1                               # one per layer
        d = v["densities"][0]
        assert set(d) == {"xs", "ys", "xy"} and all(0 < d[k] < 1 for k in d)
        assert d["xy"] <= d["xs"] and d["xy"] <= d["ys"]


def test_resume_refuses_other_settings(tmp_path):
    tr.train(_cfg("gpt2", ["--steps", "2", "--ckpt-dir", str(tmp_path)]), CORPUS)
    cfg = _cfg("gpt2", ["--steps", "4", "--ckpt-dir", str(tmp_path), "--resume",
                        "--batch-size", "2"])
    with pytest.raises(SystemExit, match="batch_size=4 .now 2"):
        tr.train(cfg, CORPUS)


def test_finished_run_extends_with_more_steps(tmp_path):
    full = tr.train(_cfg("gpt2", ["--steps", "8", "--eval-every", "4"]), CORPUS)
    tr.train(_cfg("gpt2", ["--steps", "4", "--eval-every", "4", "--ckpt-dir", str(tmp_path)]),
             CORPUS)
    more = tr.train(_cfg("gpt2", ["--steps", "8", "--eval-every", "4", "--ckpt-dir",
                                  str(tmp_path), "--resume"]), CORPUS)
    assert [r["loss"] for r in more["train"]] == [r["loss"] for r in full["train"]]
    assert [v["step"] for v in more["val"]] == [0, 4, 8]
    assert [s["start_step"] for s in more["sessions"]] == [0, 4]


def test_main_summary_states_both_parameter_counts(tmp_path, capsys):
    log = tr.main(["--model", "gpt2", "--steps", "2", "--eval-every", "2", "--block-size", "32",
                   "--bdh", "n_layer=1,n_embd=32", "--out", str(tmp_path)], corpus=CORPUS)
    text = capsys.readouterr().out
    assert f"{log['meta']['params']:,} params" in text
    assert f"matched to BDH's {log['meta']['matched_to_bdh_params']:,}" in text
    saved = json.loads((tmp_path / "train_log.json").read_text())
    assert saved["status"] == "finished" and saved["train"][-1]["step"] == 2

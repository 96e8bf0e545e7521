"""The training loop: learning, exact resume, atomic checksummed checkpoints, default output
folders, help texts, clear flag errors."""
import json
import os
import stat

import pytest

from experiments import train as tr
from experiments.results import load_torch
from glassbrain.atomic_file import CorruptFileError

TEXT = (b"the quick brown fox jumps over the lazy dog. " * 200)
CORPUS = {"train": TEXT, "val": TEXT[:3000], "test": TEXT[:3000]}
TINY = ["--steps", "24", "--batch-size", "4", "--block-size", "32", "--eval-every", "12",
        "--log-every", "1", "--eval-batches", "2"]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every CLI default (runs/train/<model>) lands in the test's own folder."""
    monkeypatch.chdir(tmp_path)


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

    ck = tmp_path / "ck"
    cfg = _cfg(model, ["--ckpt-dir", str(ck), "--ckpt-every", "10"])

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
    assert sorted(p.name for p in ck.iterdir()) == [f"{model}.pt"]   # no temp files


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    cfg = _cfg("gpt2", ["--ckpt-dir", str(tmp_path), "--max-minutes", "0", "--out",
                        str(tmp_path / "out")])
    log = tr.train(cfg, CORPUS)
    assert log["status"] == "interrupted"
    saved = load_torch(tmp_path / "gpt2.pt")
    assert saved["step"] == 0
    assert json.loads((tmp_path / "out" / "train_log.json").read_text())["status"] == \
        "interrupted"


@pytest.mark.parametrize("flags, words", [
    (["--model", "mamba"], "--model: expected one of bdh, gpt2, bsbr, got 'mamba'"),
    (["--steps", "0"], "--steps: expected an int >= 1, got '0'"),
    (["--autocast", "fp8"], "--autocast: expected one of none, bfloat16"),
    (["--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
    (["--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
    (["--bdh", "n_layers=2"], "--bdh: expected KEY=VALUE pairs with KEY among"),
    (["--bdh", "n_layer=0"], "--bdh: "),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:i, got 'tpu'"),
    (["--max-minutes", "-1"], "--max-minutes: expected a number >= 0"),
])
def test_bad_flags_fail_clearly(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        tr.config_from_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and words in err, err


def test_paths_and_library_configs_are_checked():
    cfg = tr.config_from_args(["--max-minutes", "5"])      # --ckpt-dir defaults: resumable
    assert cfg.ckpt_dir == os.path.join("runs", "train", "bdh", "ckpt")
    bare = tr.TrainConfig(resume=True)                      # the library call has no default
    with pytest.raises(ValueError, match="--ckpt-dir"):
        tr.validate(bare)
    with pytest.raises(ValueError, match="--lr: expected a number > 0, got nan"):
        tr.train(tr.TrainConfig(lr=float("nan")), CORPUS)


def test_bdh_flag_overrides_the_preset():
    cfg = tr.config_from_args(["--bdh", "n_layer=1, dropout=0.0,backend=torch"])
    assert cfg.bdh == dict(tr.PRESETS["cpu"]["bdh"], n_layer=1, dropout=0.0, backend="torch")
    assert tr.PRESETS["cpu"]["bdh"]["n_layer"] == 2                  # the preset is untouched
    h100 = tr.config_from_args(["--preset", "h100", "--device", "cpu"])
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


def test_defaults_write_under_runs_and_a_bare_run_resumes(tmp_path):
    """No --out / --ckpt-dir: the log and a checkpoint go to runs/train/<model> (gitignored),
    never results/, so rerunning with --resume and more steps continues the run."""
    cfg = tr.config_from_args(["--model", "gpt2"])
    assert (cfg.out, cfg.ckpt_dir) == ("runs/train/gpt2", os.path.join("runs/train/gpt2", "ckpt"))
    args = ["--model", "gpt2", "--eval-every", "2", "--block-size", "32", "--batch-size", "2",
            "--bdh", "n_layer=1,n_embd=32"]
    first = tr.main(args + ["--steps", "2"], corpus=CORPUS)
    out = tmp_path / "runs" / "train" / "gpt2"
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "train_log.json"]
    assert load_torch(out / "ckpt" / "gpt2.pt")["step"] == 2
    assert not (tmp_path / "results").exists()
    more = tr.main(args + ["--steps", "4", "--resume"], corpus=CORPUS)
    assert [s["start_step"] for s in more["sessions"]] == [0, 2]
    assert more["train"][:len(first["train"])] == first["train"]


def test_result_files_are_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        tr.main(["--model", "gpt2", "--steps", "1", "--eval-every", "1", "--block-size", "32",
                 "--bdh", "n_layer=1,n_embd=32"], corpus=CORPUS)
    finally:
        os.umask(old)
    out = tmp_path / "runs" / "train" / "gpt2"
    for f in (out / "train_log.json", out / "ckpt" / "gpt2.pt"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_corrupt_checkpoint_fails_clearly_on_resume(tmp_path):
    args = ["--model", "gpt2", "--eval-every", "2", "--block-size", "32", "--batch-size", "2",
            "--bdh", "n_layer=1,n_embd=32"]
    tr.main(args + ["--steps", "2"], corpus=CORPUS)
    ckpt = tmp_path / "runs" / "train" / "gpt2" / "ckpt" / "gpt2.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])                       # truncated
    with pytest.raises(CorruptFileError,
                       match="runs/train/gpt2/ckpt/gpt2.pt: .*truncated.*delete it to train from"):
        tr.main(args + ["--steps", "4", "--resume"], corpus=CORPUS)


def test_every_flag_has_help_and_shows_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        tr.config_from_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/train/<model>)" in text and "(default: <out>/ckpt)" in text
    assert "300 with --preset cpu, 3000 with --preset h100" in text
    assert "None" not in text
    import dataclasses
    for f in dataclasses.fields(tr.TrainConfig):
        if f.name != "preset":
            assert "--" + f.name.replace("_", "-") in text, f.name


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

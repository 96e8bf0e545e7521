"""experiments.long_range: a tiny run into tmp_path (JSON / Markdown / PNG contract), resume
that continues rather than restarts, and clear errors for bad flags."""
import json

import pytest

from experiments import long_range

TINY = ["--mixers", "linear,sliding", "--eval-tasks", "copy,mqar", "--eval-lengths", "16,24",
        "--vocab", "24", "--d-model", "16", "--n-head", "2", "--n-layer", "1",
        "--batch-size", "4", "--eval-batch", "4", "--log-every", "1", "--window", "8"]


def test_tiny_run_writes_the_json_contract_and_resumes(tmp_path):
    out = str(tmp_path)
    res = long_range.main(TINY + ["--steps", "3", "--out", out])
    data = json.loads((tmp_path / "long_range.json").read_text())
    assert set(data) >= {"meta", "config", "curriculum", "mixers"}
    assert list(data["mixers"]) == ["linear", "sliding"] == list(res["mixers"])
    for name, r in data["mixers"].items():
        assert r["status"] == "finished", name
        assert [e["step"] for e in r["train"]] == [1, 2, 3]
        assert r["params"] > 0 and r["sessions"] == [r["sessions"][0]]
        cells = {(e["task"], e["length"]) for e in r["eval"]}
        assert cells == {(t, L) for t in ("copy", "mqar") for L in (16, 24)}
        for e in r["eval"]:
            assert 0.0 <= e["acc"] <= 1.0 and 0.0 <= e["seq_acc"] <= 1.0 and e["answers"] > 0
        assert set(r["state_bytes"]) == {"16", "24"}
        assert all(b > 0 for b in r["state_bytes"].values())
        assert (tmp_path / name / "ckpt" / "state.pt").is_file()
    # the linear state is fixed-size; the sliding window's KV cache stops growing at its window
    assert data["mixers"]["linear"]["state_bytes"]["16"] == \
        data["mixers"]["linear"]["state_bytes"]["24"]
    md = (tmp_path / "long_range.md").read_text()
    assert "| mixer | task | T=16 | T=24 |" in md and "bytes T=24" in md
    assert (tmp_path / "long_range.png").stat().st_size > 1000

    # Resume with more steps: each mixer continues from step 3, it does not restart.
    res2 = long_range.main(TINY + ["--steps", "5", "--out", out, "--resume"])
    for name, r in res2["mixers"].items():
        assert [s["start_step"] for s in r["sessions"]] == [0, 3], name
        assert [s["end_step"] for s in r["sessions"]] == [3, 5], name
        assert [e["step"] for e in r["train"]] == [1, 2, 3, 4, 5], name
        assert r["status"] == "finished"
    # A finished mixer resumed at the same step count is not retrained.
    res3 = long_range.main(TINY + ["--steps", "5", "--out", out, "--resume"])
    assert res3["mixers"]["linear"]["sessions"] == res2["mixers"]["linear"]["sessions"]


def test_time_limit_stops_cleanly_and_resume_finishes(tmp_path):
    out = str(tmp_path)
    res = long_range.main(TINY + ["--mixers", "linear", "--steps", "2", "--out", out,
                                  "--max-minutes", "0"])
    r = res["mixers"]["linear"]
    # stopped at step 0, and still scored (every eval task at every length)
    assert r["status"] == "interrupted" and r["sessions"][-1]["end_step"] == 0
    assert len(r["eval"]) == len(res["config"]["eval_tasks"]) * len(res["config"]["eval_lengths"])
    assert (tmp_path / "linear" / "ckpt" / "state.pt").is_file()
    assert json.loads((tmp_path / "long_range.json").read_text())["mixers"]["linear"][
        "status"] == "interrupted"
    res = long_range.main(TINY + ["--mixers", "linear", "--steps", "2", "--out", out,
                                  "--resume"])
    r = res["mixers"]["linear"]
    assert r["status"] == "finished" and [s["start_step"] for s in r["sessions"]] == [0, 0]
    assert r["sessions"][-1]["end_step"] == 2 and "eval" in r


def test_jobs_train_the_mixers_in_parallel_processes(tmp_path):
    """--jobs 2: two spawned processes; the result has both mixers trained, scored and
    checkpointed exactly as a sequential run has them."""
    flags = TINY + ["--mixers", "linear,softmax", "--steps", "2"]
    par = long_range.main(flags + ["--out", str(tmp_path / "par"), "--jobs", "2"])
    seq = long_range.main(flags + ["--out", str(tmp_path / "seq")])
    assert list(par["mixers"]) == ["linear", "softmax"]
    for m in ("linear", "softmax"):
        p, s = par["mixers"][m], seq["mixers"][m]
        assert p["status"] == "finished" and p["sessions"][-1]["end_step"] == 2
        assert (tmp_path / "par" / m / "ckpt" / "state.pt").is_file()
        assert [e["task"] for e in p["eval"]] == [e["task"] for e in s["eval"]]
        losses = [[round(e["loss"], 4) for e in r["train"]] for r in (p, s)]
        assert losses[0] == losses[1] and losses[0]
    saved = json.loads((tmp_path / "par" / "long_range.json").read_text())
    assert set(saved["mixers"]) == {"linear", "softmax"}


def test_resume_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path)
    long_range.main(TINY + ["--mixers", "linear", "--steps", "1", "--out", out])
    with pytest.raises(SystemExit, match="lr"):
        long_range.main(TINY + ["--mixers", "linear", "--steps", "2", "--out", out, "--resume",
                                "--lr", "0.5"])


@pytest.mark.parametrize("flags, words", [
    (["--mixers", "softmax,nope"], ["--mixers", "nope"]),
    (["--eval-tasks", "copy,zzz"], ["--eval-tasks", "zzz"]),
    (["--eval-lengths", "16,x"], ["--eval-lengths", "16,x"]),
    (["--eval-lengths", "2"], ["--eval-lengths", "4"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--threshold", "1.5"], ["--threshold", "1.5"]),
    (["--d-model", "33", "--n-head", "2"], ["--d-model", "33"]),
    (["--vocab", "6"], ["--vocab", "6"]),
    (["--curriculum", "nope"], ["--curriculum", "nope"]),
    (["--preset", "tpu"], ["--preset", "tpu"]),
    (["--hebbian-neurons", "-2"], ["--hebbian-neurons", "-2"]),
    (["--hebbian-heads", "-1"], ["--hebbian-heads", "-1"]),
    (["--hebbian-rope", "2"], ["--hebbian-rope", "2"]),
])
def test_bad_flags_exit_with_a_clear_message(flags, words, capsys):
    with pytest.raises(SystemExit):
        long_range.main(flags + ["--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    for w in words:
        assert w in err


def test_presets_and_help():
    cfg = long_range.config_from_args(["--preset", "h100", "--device", "cpu"])
    assert cfg.vocab == 8192 and cfg.curriculum == "mqar" and cfg.eval_lengths == (256, 512, 1024)
    assert 64 <= cfg.d_model <= 128 and cfg.n_layer == 2
    cpu = long_range.config_from_args([])
    assert cpu.out == "runs/long_range" and max(cpu.eval_lengths) <= 256
    text = long_range.build_parser().format_help()
    for flag in ("--mixers", "--max-minutes", "--resume", "--eval-lengths", "--preset"):
        assert flag in text


def test_hebbian_neurons_give_the_equal_state_comparison():
    """N = d_model / n_head² per head: the hebbian mixer's state equals linear attention's
    (up to the normaliser column); the default (0) keeps BDHAttention's 16·d_model/n_head."""
    import torch
    cfg = long_range.config_from_args(["--d-model", "64", "--n-head", "2", "--vocab", "64",
                                       "--hebbian-neurons", "16"])
    nbytes = {}
    for m in ("bdh", "linear"):
        model = long_range.build_model(cfg, m)
        _, st = model(torch.randint(0, 64, (1, 8)), return_state=True)
        nbytes[m] = st.nbytes()
    assert abs(nbytes["bdh"] - nbytes["linear"]) <= 0.05 * nbytes["linear"]
    big = long_range.build_model(long_range.config_from_args(["--d-model", "64", "--n-head", "2",
                                                              "--vocab", "64"]), "bdh")
    assert sum(p.numel() for p in big.parameters()) > sum(
        p.numel() for p in long_range.build_model(cfg, "bdh").parameters())


def test_hebbian_heads_keep_the_state_and_widen_the_keys():
    """One hebbian head with N = d_model / n_head: the same state as linear attention (and as
    n_head heads of d_model / n_head² neurons), keys as wide as a linear head's."""
    import torch
    base = ["--d-model", "64", "--n-head", "2", "--vocab", "64"]
    one = long_range.config_from_args(base + ["--hebbian-heads", "1", "--hebbian-neurons", "32"])
    mixers = [m for m in long_range.build_model(one, "bdh").modules()
              if type(m).__name__ == "BDHAttention"]
    assert mixers and all(m.n_head == 1 and m.N == 32 for m in mixers)
    nbytes = {}
    for name, cfg, m in (("one", one, "bdh"), ("linear", one, "linear")):
        _, st = long_range.build_model(cfg, m)(torch.randint(0, 64, (1, 8)), return_state=True)
        nbytes[name] = st.nbytes()
    assert abs(nbytes["one"] - nbytes["linear"]) <= 0.05 * nbytes["linear"]
    # The override is the hebbian mixer's alone: linear keeps --n-head.
    lin = [m for m in long_range.build_model(one, "linear").modules()
           if type(m).__name__ == "LinearAttention"]
    assert lin and all(m.n_head == 2 for m in lin)


def test_hebbian_rope_off_reaches_the_mixer_and_old_checkpoints_still_resume(tmp_path):
    """--hebbian-rope 0 builds BDHAttention(rope=False) (the other mixers are untouched); a
    checkpoint written before the flag existed resumes as the default (RoPE on)."""
    off = long_range.config_from_args(["--d-model", "64", "--n-head", "2", "--vocab", "64",
                                       "--hebbian-rope", "0"])
    mixers = [m for m in long_range.build_model(off, "bdh").modules()
              if type(m).__name__ == "BDHAttention"]
    assert mixers and not any(m.attn.rope for m in mixers)
    on = long_range.build_model(long_range.config_from_args(["--vocab", "64"]), "bdh")
    assert all(m.attn.rope for m in on.modules() if type(m).__name__ == "BDHAttention")
    out = str(tmp_path)
    long_range.main(TINY + ["--mixers", "bdh", "--steps", "1", "--out", out])
    ckpt = tmp_path / "bdh" / "ckpt" / "state.pt"
    from experiments.results import load_torch, save_torch
    saved = load_torch(ckpt, map_location="cpu")
    del saved["config"]["hebbian_rope"]                  # as written before the flag existed
    save_torch(saved, ckpt)
    long_range.main(TINY + ["--mixers", "bdh", "--steps", "2", "--out", out, "--resume"])
    with pytest.raises(SystemExit, match="hebbian-rope"):
        long_range.main(TINY + ["--mixers", "bdh", "--steps", "3", "--out", out, "--resume",
                                "--hebbian-rope", "0"])


def test_a_checkpoint_of_the_mixer_once_called_hebbian_resumes_as_bdh(tmp_path):
    """The bdh mixer was named "hebbian": a run checkpointed under OUT/hebbian/ resumes as bdh
    (and saves under OUT/bdh/ from then on)."""
    out = str(tmp_path)
    long_range.main(TINY + ["--mixers", "bdh", "--steps", "1", "--out", out])
    (tmp_path / "bdh").rename(tmp_path / "hebbian")
    from experiments.results import load_torch
    result = long_range.main(TINY + ["--mixers", "bdh", "--steps", "2", "--out", out, "--resume"])
    saved = load_torch(tmp_path / "bdh" / "ckpt" / "state.pt", map_location="cpu")
    assert saved["step"] == 2 and saved["log"]["mixer"] == "bdh"
    assert result["mixers"]["bdh"]["sessions"][0]["start_step"] == 0
    assert result["mixers"]["bdh"]["sessions"][-1]["start_step"] == 1

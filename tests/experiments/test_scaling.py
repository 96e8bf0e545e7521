"""experiments.scaling: a tiny CPU run, the JSON contract, slopes, and OOM recorded as data."""
import json
import math

import pytest
import torch

from experiments import scaling

TINY = ["--lengths", "16,32,48", "--long-lengths", "96", "--d-model", "16", "--n-head", "2",
        "--stream-chunk", "16", "--reps", "1", "--window", "8"]


def test_tiny_cpu_run_writes_the_contract(tmp_path):
    mixers = "softmax,linear,sliding,deltanet"
    threads_before = torch.get_num_threads()
    res = scaling.main(TINY + ["--mixers", mixers, "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "scaling.json").read_text())
    assert on_disk["points"] == json.loads(json.dumps(res["points"]))
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "log-log slopes" in (tmp_path / "scaling.md").read_text()
    meta = on_disk["meta"]
    assert meta["config"]["lengths"] == [16, 32, 48] and "commit" in meta and "device" in meta
    for p in on_disk["points"]:
        assert {"mixer", "pass", "T", "oom", "ms", "peak_bytes"} <= set(p)
        assert not p["oom"] and "error" not in p, p
        assert p["ms"] > 0 and p["peak_bytes"] > 0
    got = {(p["mixer"], p["pass"], p["T"]) for p in on_disk["points"]}
    for m in mixers.split(","):
        for pass_name in scaling.PASSES:
            for T in (16, 32, 48):
                assert (m, pass_name, T) in got
    # The long context is only streamed / decoded, and only by the bounded-state mixers.
    assert ("linear", "decode", 96) in got and ("sliding", "stream", 96) in got
    assert ("softmax", "decode", 96) not in got and ("linear", "fwd", 96) not in got
    slopes = on_disk["slopes"]
    for m in mixers.split(","):
        for key in (*scaling.PASSES, "decode_peak_bytes", "state_bytes"):
            assert math.isfinite(slopes[m][key]), (m, key)
    # State sizes: the KV cache grows linearly, the recurrent states not at all.
    assert slopes["softmax"]["state_bytes"] == pytest.approx(1.0)
    for m in ("linear", "deltanet", "sliding"):
        assert slopes[m]["state_bytes"] == 0.0
    decode = {p["T"]: p["state_bytes"] for p in on_disk["points"]
              if p["mixer"] == "softmax" and p["pass"] == "decode"}
    assert decode == {T: 2 * 2 * T * 8 * 4 for T in (16, 32, 48)}
    sliding = {p["state_bytes"] for p in on_disk["points"]
               if p["mixer"] == "sliding" and p["pass"] == "decode"}
    assert sliding == {2 * 2 * 7 * 8 * 4}                  # w − 1 = 7 cached tokens
    assert meta["config"]["mixer_kwargs"]["sliding"]["window"] == 8
    assert torch.get_num_threads() == threads_before       # the run restores torch's threads


def test_oom_is_recorded_and_ends_the_sweep(tmp_path, monkeypatch):
    real = scaling.measure_point

    def fake(attn, pass_name, T, cfg, device, dtype, **kw):
        if pass_name == "fwd" and T >= 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if pass_name == "stream" and T >= 32:
            raise RuntimeError("some other failure")
        return real(attn, pass_name, T, cfg, device, dtype, **kw)

    monkeypatch.setattr(scaling, "measure_point", fake)
    res = scaling.main(TINY + ["--mixers", "linear", "--out", str(tmp_path)])
    by = {(p["pass"], p["T"]): p for p in res["points"]}
    assert by[("fwd", 32)]["oom"] and by[("fwd", 32)]["ms"] is None
    assert ("fwd", 48) not in by                          # the sweep stopped at the OOM
    assert "some other failure" in by[("stream", 32)]["error"]
    assert ("decode", 16) in by and ("decode", 32) not in by   # decode needs the stream
    assert res["meta"]["stopped"]["linear/fwd"] == {"reason": "oom", "T": 32}
    assert res["slopes"]["linear"]["fwd"] is None          # one point left: no slope
    assert math.isfinite(res["slopes"]["linear"]["fwd_bwd"])


def test_loglog_slope_recovers_power_laws():
    from experiments.harness import loglog_slope
    Ts = [64, 128, 256, 1024]
    assert loglog_slope(Ts, [3 * T ** 2 for T in Ts]) == pytest.approx(2.0)
    assert loglog_slope(Ts, [5.0] * 4) == 0.0
    assert loglog_slope([64], [1.0]) is None
    assert loglog_slope(Ts, [1.0, None, 0.0, 4.0]) == pytest.approx(math.log(4) / math.log(16))


def test_bad_arguments_exit(capsys):
    for flags, words in ((["--mixers", "softmax,mamba"], "--mixers: expected a comma list"),
                         (["--passes", "train"], "--passes: expected a comma list"),
                         (["--lengths", "-5"], "--lengths: expected a comma list of ints >= 1"),
                         (["--reps", "0"], "--reps: expected an int >= 1, got '0'"),
                         (["--d-model", "33"], "--d-model: expected a multiple of --n-head")):
        with pytest.raises(SystemExit) as e:
            scaling.parse_args(flags)
        assert e.value.code == 2 and words in capsys.readouterr().err
    cfg = scaling.parse_args(["--preset", "h100", "--device", "cpu", "--lengths", "8"])
    assert cfg.d_model == 768 and cfg.lengths == (8,) and cfg.long_lengths[-1] == 2 ** 20


def test_deadline_leaves_the_longest_contexts_out(tmp_path):
    res = scaling.main(TINY + ["--mixers", "softmax,linear", "--deadline-s", "0",
                               "--out", str(tmp_path)])
    assert res["points"] == []                      # no point starts after the deadline
    assert res["meta"]["not_run"][0] == "softmax/fwd/16"      # shortest T first, all mixers
    assert res["meta"]["not_run"][1:4] == ["softmax/fwd_bwd/16", "softmax/stream/16",
                                           "softmax/decode/16"]
    assert res["meta"]["not_run"][4] == "linear/fwd/16"
    assert res["meta"]["not_run"][-1] == "linear/decode/96"
    assert (tmp_path / "scaling.md").exists() and (tmp_path / "scaling.png").exists()


def test_decode_alone_streams_its_own_context(tmp_path):
    res = scaling.main(TINY + ["--mixers", "softmax", "--passes", "decode",
                               "--out", str(tmp_path)])
    got = {p["T"]: p["state_bytes"] for p in res["points"]}
    assert got == {T: 2 * 2 * T * 8 * 4 for T in (16, 32, 48)}
    assert {p["pass"] for p in res["points"]} == {"decode"}


def test_point_time_cap_spares_the_first_point(tmp_path):
    """--max-point-s 0: every mixer/pass keeps its first point (which pays compilation), and
    the cap ends the sweep after its second."""
    res = scaling.main(TINY + ["--mixers", "linear", "--passes", "fwd", "--max-point-s", "0",
                               "--out", str(tmp_path)])
    Ts = [p["T"] for p in res["points"]]
    assert len(Ts) == 2 and Ts == sorted(Ts)
    assert res["meta"]["stopped"]["linear/fwd"]["reason"] == "time"


def test_stream_pass_warms_its_piece_shapes_before_the_timed_run(monkeypatch):
    """The timed stream run must not be the first call of any piece shape (first piece without
    a state, later pieces with one): those calls compile / autotune on a GPU."""
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x, state=None, return_state=False):
            calls.append((x.shape[1], state is not None))
            return x, (state or 0) + 1

    cfg = scaling.ScalingConfig(stream_chunk=4, batch=1, d_model=3)
    timed_from = []
    real = scaling.peak_bytes

    def spy(fn, device):
        timed_from.append(len(calls))
        return real(fn, device)
    monkeypatch.setattr(scaling, "peak_bytes", spy)
    scaling.measure_point(Recorder(), "stream", 12, cfg, torch.device("cpu"), torch.float32)
    warm, timed = calls[:timed_from[0]], calls[timed_from[0]:]
    assert timed == [(4, False), (4, True), (4, True)]
    assert set(timed) <= set(warm)

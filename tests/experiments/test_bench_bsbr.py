"""The BSBR benchmark's code paths on the CPU with tiny sizes (a smoke; timings need a GPU):
the JSON contract, the reference check, the decode sweep's flat bounded-bank state."""
import json

import pytest
import torch

from experiments import bench_bsbr

TINY = ["--lengths", "32,48", "--heads", "2", "--head-dim", "8", "--chunk", "8", "--top-k", "2",
        "--window", "16", "--check-T", "24", "--decode-lengths", "32,96,160", "--reps", "1"]


def test_v1_pins_select_the_old_paths_and_restore():
    from kernels.bsbr import readout_grouped, routing
    with bench_bsbr.v1_pins(True):
        assert routing.ROUTING == {"triton": False}
        assert readout_grouped.GROUPED_READOUT == {"lowp": False}
    assert routing.ROUTING == {} and readout_grouped.GROUPED_READOUT == {}
    with bench_bsbr.v1_pins(False):
        assert routing.ROUTING == {} and readout_grouped.GROUPED_READOUT == {}


def test_readout_launch_sweep_picks_the_fastest_and_restores_the_pins(tmp_path, monkeypatch):
    from kernels.bsbr import readout_grouped, readout_triton
    seen = []

    def fake_time(fn, dev, reps, grads=()):
        fn()
        seen.append({**readout_grouped.GROUPED_READOUT,
                     **{"df_" + k: v for k, v in readout_triton.DF_LAUNCH.items()}})
        pin = seen[-1]
        # fastest: the two-pass backward with the old dF launch (the second-last row)
        old_two_pass = pin.get("fused_bwd") is False and pin.get("df_block") == 32
        return 1.0 if old_two_pass else 2.0 + pin["warps"] / 100
    monkeypatch.setattr(bench_bsbr, "time_ms", fake_time)
    sz = bench_bsbr.Sizes(heads=2, head_dim=8, chunk=8, top_k=2, dtype="float32")
    b = bench_bsbr.Bench(tmp_path, {})
    pick = bench_bsbr.tune_readout(b, sz, torch.device("cpu"), torch.float32, 32)
    assert seen == list(bench_bsbr.TUNE_LAUNCHES)
    best = {"block": 64, "warps": 4, "bv": 64, "fused_bwd": False, "df_block": 32, "df_bv": 64,
            "df_warps": 4}
    assert pick == best and b.data["tune"]["best"] == pick
    assert readout_grouped.GROUPED_READOUT == {} and readout_triton.DF_LAUNCH == {}
    with bench_bsbr.launch_pins(pick):
        assert readout_grouped.GROUPED_READOUT == {"block": 64, "warps": 4, "bv": 64,
                                                   "fused_bwd": False}
        assert readout_triton.DF_LAUNCH == {"block": 32, "bv": 64, "warps": 4}
    assert readout_grouped.GROUPED_READOUT == {} and readout_triton.DF_LAUNCH == {}


def test_routing_launch_sweep_picks_the_fastest_launch_with_the_same_slots(tmp_path,
                                                                          monkeypatch):
    from kernels.bsbr import routing_triton
    seen = []
    real = routing_triton.SelectedScoresTriton.apply

    def fake_apply(*a):
        idx, sel = real(*a)
        if routing_triton.ROUTE_LAUNCH["BQ"] == 128:          # "picks other slots"
            idx = idx.flip(-1)
        return idx, sel

    def fake_time(fn, dev, reps, grads=()):
        fn()
        pin = dict(routing_triton.ROUTE_LAUNCH)
        seen.append(pin)
        # BQ 128 is "fastest" but selects differently: the pick must skip it.
        return {32: 3.0, 64: 1.0, 128: 0.1}[pin["BQ"]] + pin["BS"] / 1e3 \
            - (pin["prec"] == "tf32x3") / 10
    monkeypatch.setattr(routing_triton.SelectedScoresTriton, "apply", fake_apply)
    monkeypatch.setattr(bench_bsbr, "time_ms", fake_time)
    sz = bench_bsbr.Sizes(heads=2, head_dim=8, chunk=8, top_k=2, dtype="float32")
    b = bench_bsbr.Bench(tmp_path, {})
    pick = bench_bsbr.tune_routing(b, sz, torch.device("cpu"), torch.float32, 40)
    assert seen == [{"BQ": q, "BS": s, "warps": w, "prec": p}
                    for q, s, w, p in bench_bsbr.TUNE_ROUTES]
    assert pick == {"route_BQ": 64, "route_BS": 32, "route_warps": 4, "route_prec": "tf32x3"}
    rows = b.data["tune_routing"]["rows"]
    assert b.data["tune_routing"]["best"] == pick
    assert [r["same_slots"] < 1.0 for r in rows] == [r["BQ"] == 128 for r in rows]
    assert routing_triton.ROUTE_LAUNCH == {}
    with bench_bsbr.launch_pins({**pick, "block": 32}):
        assert routing_triton.ROUTE_LAUNCH == {"BQ": 64, "BS": 32, "warps": 4, "prec": "tf32x3"}
    assert routing_triton.ROUTE_LAUNCH == {}


def test_cpu_smoke_writes_the_json_contract(tmp_path):
    methods = "bsbr,bsbr_v1,bsbr_torch,sdpa,flex_swa,fla_linear"
    data = bench_bsbr.main(TINY + ["--methods", methods, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_bsbr.json").read_text())
    assert set(saved) == {"meta", "checks", "rows", "slopes", "decode", "decode_summary",
                          "skipped", "tune", "profile"}
    assert saved["meta"]["preset"] == "cpu" and saved["meta"]["sizes"]["chunk"] == 8
    # Ours against the float64 reference: output and all five input gradients.
    (check,) = saved["checks"]
    assert check["T"] == 24 and check["dtype"] == "float32"
    for key in ("out", "dq", "dk", "dv", "dr", "dhk"):
        assert check[key] < 1e-4, (key, check[key])
    by = {(r["method"], r["T"]): r for r in saved["rows"]}
    for m in ("bsbr", "bsbr_v1", "bsbr_torch", "sdpa"):
        for T in (32, 48):
            r = by[m, T]
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["note"] is None, r
            assert r["fwd_peak_bytes"] > 0 and r["fwd_bwd_peak_bytes"] > 0
    assert by["flex_swa", 32]["fwd_ms"] > 0                # its backward is GPU-only
    assert "fla_linear" in saved["skipped"] or ("fla_linear", 32) in by
    assert set(saved["slopes"]["bsbr"]) == {"fwd", "fwd_bwd"}
    # Decode: the bounded bank's state is the same size at every length, the exact one grows.
    dec = {(r["bank"], r["L"]): r for r in saved["decode"]}
    bounded = [dec["bounded", L]["state_bytes"] for L in (32, 96, 160)]
    assert len(set(bounded)) == 1 and bounded[0] > 0
    exact = [dec["exact", L]["state_bytes"] for L in (32, 96, 160)]
    assert exact[0] < exact[1] < exact[2]
    assert all(r["decode_peak_bytes"] > 0 and r["decode_ms_per_token"] > 0
               for r in saved["decode"])
    # (2,2,1) slots at chunk 8: 32 tokens = 4 chunks merge already; all finite and measured.
    errs = [dec["bounded", L]["vs_exact_rel_err"] for L in (32, 96, 160)]
    assert all(e is not None and 0 <= e < 10 for e in errs), errs
    summary = saved["decode_summary"]
    assert summary["bounded"]["state_ratio"] == 1.0 and summary["exact"]["state_ratio"] > 2
    assert summary["bounded"]["L_max"] == 160
    assert data["rows"] == saved["rows"]
    md = (tmp_path / "bench_bsbr.md").read_text()
    assert "| bsbr | 48 |" in md and "## decode memory" in md
    assert (tmp_path / "bench_bsbr.png").stat().st_size > 10_000


def test_bad_flags(tmp_path):
    with pytest.raises(SystemExit, match="--methods"):
        bench_bsbr.main(["--methods", "bsbr,flash", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--lengths"):
        bench_bsbr.main(["--lengths", "32,x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--bank.*slots_per_level"):
        bench_bsbr.main(["--bank", "1,2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--chunk"):
        bench_bsbr.main(["--chunk", "0", "--out", str(tmp_path)])


def test_kernel_deadline_leaves_time_for_the_decode_sweep(tmp_path):
    """--kernel-deadline-s 0: no kernel row starts (all listed under not_run, shortest T first
    across methods), and the decode sweep still runs."""
    data = bench_bsbr.main(TINY + ["--methods", "bsbr,sdpa", "--kernel-deadline-s", "0",
                                   "--out", str(tmp_path)])
    assert data["rows"] == []
    assert data["not_run"] == ["bsbr/32", "sdpa/32", "bsbr/48", "sdpa/48"]
    assert {r["bank"] for r in data["decode"]} == {"bounded", "exact"}


def test_profile_records_the_kernels_of_one_fwd_bwd(tmp_path, monkeypatch):
    """profile_bsbr's step runs a bsbr fwd+bwd under the launch pins (here on the CPU, with the
    profiler replaced: the real one is CUDA-only) and its rows land in the JSON and Markdown."""
    import kernels.bsbr
    from kernels.bsbr import readout_grouped
    seen = []
    real = kernels.bsbr.bsbr_attention

    def spy(*a, **k):                     # the pins in force while the attention runs
        seen.append(dict(readout_grouped.GROUPED_READOUT))
        return real(*a, **k)
    monkeypatch.setattr(kernels.bsbr, "bsbr_attention", spy)

    def fake_profile(step, steps, top):
        for i in range(steps + 1):
            step(i)
        return [{"name": "k1", "calls": 2, "us_total": 30.0}, {"name": "k2", "calls": 1,
                                                              "us_total": 12.0}]
    monkeypatch.setattr(bench_bsbr, "cuda_kernel_profile", fake_profile)
    sz = bench_bsbr.Sizes(heads=2, head_dim=8, chunk=8, top_k=2, dtype="float32")
    b = bench_bsbr.Bench(tmp_path, {"device": "cpu", "commit": "x", "date": "d", "sizes": {}})
    launch = {"block": 32, "warps": 4, "bv": 64}
    bench_bsbr.profile_bsbr(b, sz, torch.device("cpu"), torch.float32, 40, launch)
    assert seen == [launch] * 3 and readout_grouped.GROUPED_READOUT == {}
    prof = json.loads((tmp_path / "bench_bsbr.json").read_text())["profile"]
    assert prof["T"] == 40 and prof["us_total"] == 42.0 and len(prof["rows"]) == 2
    assert "CUDA kernels of one bsbr fwd+bwd at T = 40" in bench_bsbr.markdown(b.data)

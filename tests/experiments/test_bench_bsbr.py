"""The BSBR benchmark's code paths on the CPU with tiny sizes (a smoke; timings need a GPU):
the JSON contract, the reference check, the decode sweep's flat bounded-bank state."""
import json

import pytest
import torch

from experiments import bench_bsbr

TINY = ["--lengths", "32,48", "--heads", "2", "--head-dim", "8", "--chunk", "8", "--top-k", "2",
        "--window", "16", "--check-T", "24", "--decode-lengths", "32,96,160", "--reps", "1"]


def spy_on_bsbr(monkeypatch):
    """The launch= of every kernels.bsbr.bsbr_attention call."""
    import kernels.bsbr
    seen = []
    real = kernels.bsbr.bsbr_attention

    def spy(*a, **k):
        seen.append(k.get("launch"))
        return real(*a, **k)
    monkeypatch.setattr(kernels.bsbr, "bsbr_attention", spy)
    return seen


def test_methods_pass_their_launch_per_call(monkeypatch):
    """bsbr_v1 runs the PyTorch routing and float32-F products, bsbr the launch it is given;
    both per call, so the two run side by side in one process."""
    from kernels.bsbr import BSBRLaunch, ReadoutLaunch
    seen = spy_on_bsbr(monkeypatch)
    sz = bench_bsbr.Sizes(heads=2, head_dim=8, chunk=8, top_k=2, dtype="float32")
    ins = bench_bsbr.make_inputs(sz, 24, torch.device("cpu"), torch.float32)
    mine = BSBRLaunch(readout=ReadoutLaunch(block=32))
    for name, launch in (("bsbr_v1", None), ("bsbr", mine), ("bsbr", None)):
        fn, n_grad, prep = bench_bsbr.build_method(name, sz, 24, torch.device("cpu"),
                                                   torch.float32, launch)
        assert n_grad == 5 and fn(*prep(ins)).shape == ins[2].shape
    v1 = seen[0]
    assert v1.routing.method == "torch" and v1.readout.products == "float32"
    assert seen[1:] == [mine, None]


def test_tune_launch_passes_both_winners_and_records_the_sweeps(tmp_path, monkeypatch):
    """The routing sweep runs first and the readout sweep gets its winner; the bsbr rows get
    both winners as one BSBRLaunch; the JSON records rows, winners and the shape class."""
    from kernels.bsbr import BSBRLaunch, ReadoutLaunch, RoutingLaunch, tune
    best_route, best_readout = RoutingLaunch(block_q=32), ReadoutLaunch(warps=8)
    calls = []

    def fake_routing(shape, dev):
        calls.append(("routing", shape.T, shape.top_k, shape.dtype))
        return {"shape_class": "r-class", "rows": [{"fwd_ms": 1.0}], "best": best_route,
                "path": "cache.json"}

    def fake_readout(shape, dev, routing=None):
        calls.append(("readout", shape.T, routing))
        return {"shape_class": "o-class", "rows": [{"fwd_bwd_ms": 2.0}], "best": best_readout,
                "path": "cache.json"}
    monkeypatch.setattr(tune, "tune_routing", fake_routing)
    monkeypatch.setattr(tune, "tune_readout", fake_readout)
    sz = bench_bsbr.Sizes(heads=2, head_dim=8, chunk=8, top_k=2, dtype="float32")
    b = bench_bsbr.Bench(tmp_path, {})
    launch = bench_bsbr.tune_launch(b, sz, torch.device("cpu"), torch.float32, 40)
    assert launch == BSBRLaunch(routing=best_route, readout=best_readout)
    assert calls == [("routing", 40, 2, torch.float32), ("readout", 40, best_route)]
    saved = json.loads((tmp_path / "bench_bsbr.json").read_text())
    assert saved["tune_routing"]["best"]["block_q"] == 32
    assert saved["tune"]["best"]["warps"] == 8 and saved["tune"]["shape_class"] == "o-class"


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


@pytest.mark.parametrize("flags, words", [
    (["--methods", "bsbr,flash"], "--methods: expected a comma list of bsbr"),
    (["--lengths", "32,x"], "--lengths: expected a comma list of ints >= 1, got '32,x'"),
    (["--bank", "1,2"], "--bank: BankConfig.slots_per_level"),
    (["--chunk", "0"], "--chunk: expected an int >= 1, got '0'"),
    (["--reps", "0"], "--reps: expected an int >= 1"),
    (["--preset", "h100"], "--preset: h100 needs a CUDA GPU"),
])
def test_bad_flags(tmp_path, flags, words, capsys):
    if flags[0] == "--preset" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        bench_bsbr.main(flags + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and not (tmp_path / "out").exists(), err


def test_kernel_deadline_leaves_time_for_the_decode_sweep(tmp_path):
    """--kernel-deadline-s 0: no kernel row starts (all listed under not_run, shortest T first
    across methods), and the decode sweep still runs."""
    data = bench_bsbr.main(TINY + ["--methods", "bsbr,sdpa", "--kernel-deadline-s", "0",
                                   "--out", str(tmp_path)])
    assert data["rows"] == []
    assert data["not_run"] == ["bsbr/32", "sdpa/32", "bsbr/48", "sdpa/48"]
    assert {r["bank"] for r in data["decode"]} == {"bounded", "exact"}


def test_profile_records_the_kernels_of_one_fwd_bwd(tmp_path, monkeypatch):
    """profile_bsbr's step runs a bsbr fwd+bwd with the launch passed per call (here on the CPU,
    with the profiler replaced: the real one is CUDA-only) and its rows land in the JSON and
    Markdown."""
    from kernels.bsbr import BSBRLaunch, ReadoutLaunch
    seen = spy_on_bsbr(monkeypatch)

    def fake_profile(step, steps, top):
        for i in range(steps + 1):
            step(i)
        return [{"name": "k1", "calls": 2, "us_total": 30.0}, {"name": "k2", "calls": 1,
                                                              "us_total": 12.0}]
    monkeypatch.setattr(bench_bsbr, "cuda_kernel_profile", fake_profile)
    sz = bench_bsbr.Sizes(heads=2, head_dim=8, chunk=8, top_k=2, dtype="float32")
    b = bench_bsbr.Bench(tmp_path, {"device": "cpu", "commit": "x", "date": "d", "sizes": {}})
    launch = BSBRLaunch(readout=ReadoutLaunch(block=32, warps=4, block_v=64))
    bench_bsbr.profile_bsbr(b, sz, torch.device("cpu"), torch.float32, 40, launch)
    assert seen == [launch] * 3
    prof = json.loads((tmp_path / "bench_bsbr.json").read_text())["profile"]
    assert prof["T"] == 40 and prof["us_total"] == 42.0 and len(prof["rows"]) == 2
    assert "CUDA kernels of one bsbr fwd+bwd at T = 40" in bench_bsbr.markdown(b.data)

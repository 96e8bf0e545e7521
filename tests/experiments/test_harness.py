"""experiments.harness: one timing policy for every experiment, its result type, the call counts
it makes, threads, comparison helpers, and command lines built from config dataclasses."""
from dataclasses import dataclass, field

import pytest
import torch

from experiments import bench_bdh, bench_bsbr, bench_kernels, cli, memory_wall, scaling, timing
from experiments.harness import (POLICY, Timing, TimingPolicy, loglog_slope, rel_err, time_call,
                                 torch_threads)


def counting():
    calls = []
    return calls, lambda: calls.append(1)


def test_cpu_timing_makes_the_warmup_then_at_least_min_reps_calls():
    calls, fn = counting()
    t = time_call(fn, "cpu", policy=TimingPolicy(warmup=2, min_reps=3, budget_s=0.0,
                                                 max_reps=10))
    assert len(calls) == 2 + 3 and t.reps == 3 and t.method == "wall clock"
    calls, fn = counting()
    # A budget no run reaches: max_reps ends it.
    t = time_call(fn, "cpu", policy=TimingPolicy(warmup=0, min_reps=1, budget_s=1e6,
                                                 max_reps=7))
    assert len(calls) == 7 and t.reps == 7
    assert t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms <= t.max_ms


def test_cuda_times_a_slow_call_again_for_min_reps(monkeypatch):
    """On CUDA the per-call times are do_bench's; a call slower than rep_ms (one timed run) is
    timed again for min_reps calls. A CUDA graph goes through do_bench_cudagraph. (Faked
    here: the CPU has no CUDA events.)"""
    import triton.testing
    reps = []

    def fake_bench(fn, warmup=25, rep=100, grad_to_none=None, return_mode="mean"):
        assert return_mode == "all"
        reps.append(rep)
        return [250.0] if len(reps) == 1 else [240.0] * 6

    def fake_graph(fn, rep=20, grad_to_none=None, return_mode="mean"):
        reps.append(("graph", rep))
        return [1.0, 2.0, 3.0]
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake_graph)
    t = time_call(lambda: None, "cuda", policy=TimingPolicy(min_reps=5))
    assert reps == [100.0, pytest.approx(1.2 * 5 * 250.0)]
    assert (t.median_ms, t.reps, t.method) == (240.0, 6, "do_bench")
    t = time_call(lambda: None, "cuda", cuda_graph=True)
    assert reps[-1] == ("graph", POLICY.rep_ms) and t.method == "do_bench_cudagraph"
    calls, fn = counting()                       # stepwise: the wall clock, also on CUDA
    monkeypatch.setattr(timing, "sync", lambda device: None)
    t = time_call(fn, "cuda", policy=TimingPolicy(warmup=1, min_reps=2, budget_s=0.0,
                                                  stepwise=True))
    assert len(calls) == 3 and t.method == "wall clock"


def test_grads_are_cleared_before_every_call():
    x = torch.randn(4, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad is None)
        (x * 2).sum().backward()
    time_call(step, "cpu", policy=TimingPolicy(warmup=1, min_reps=3, budget_s=0.0),
              grad_to_none=[x])
    assert seen == [True] * 4


def test_timing_of_per_call_times():
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0], "wall clock")
    assert (t.median_ms, t.min_ms, t.max_ms, t.reps) == (3.0, 1.0, 5.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)
    assert t.spread == pytest.approx((4.2 - 1.8) / 3.0)
    one = Timing.of([2.5], "do_bench")
    assert one.median_ms == one.p20_ms == one.p80_ms == 2.5 and one.spread == 0.0


@pytest.mark.parametrize("kw", [dict(min_reps=0), dict(min_reps=5, max_reps=4),
                                dict(warmup=-1), dict(budget_s=float("nan")),
                                dict(rep_ms=0.0)])
def test_policy_refuses_nonsense(kw):
    with pytest.raises(ValueError):
        TimingPolicy(**kw)


def test_with_min_reps():
    assert POLICY.with_min_reps(None) is POLICY
    p = TimingPolicy(min_reps=2, max_reps=8).with_min_reps(20)
    assert p.min_reps == 20 and p.max_reps == 20


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_bench_kernels_and_scaling_time_one_kernel_the_same_way(monkeypatch):
    """The same tiny kernel call, timed through bench_kernels' and scaling's code paths, goes
    through the one harness function with the same policy (so their numbers agree within
    noise); bench_bsbr, bench_bdh and memory_wall start from that policy too."""
    from kernels import hebbian_attention
    q, k = torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    v = torch.randn(1, 2, 24, 8)
    seen = []
    real = timing._wall_clock

    def spy(fn, device, policy, grad_to_none):
        seen.append((torch.device(device), policy))
        return real(fn, device, policy, grad_to_none)
    monkeypatch.setattr(timing, "_wall_clock", spy)

    def kernel():
        hebbian_attention(q, k, v, backend="torch")
    ms_a = bench_kernels.bench(kernel, "cpu")
    ms_b = scaling.time_ms(kernel, torch.device("cpu"), scaling.parse_args([]).policy())
    assert ms_a > 0 and ms_b > 0
    assert len(seen) == 2 and seen[0] == seen[1] == (torch.device("cpu"), POLICY)
    assert bench_bsbr.parse([]).policy() == POLICY == bench_bdh.parse([]).policy()
    assert bench_kernels.time_call is scaling.time_call is bench_bsbr.time_call is time_call
    decode = memory_wall.parse([]).decode_policy()
    assert decode.stepwise and decode.min_reps >= 16


def test_rel_err_and_loglog_slope():
    a = torch.tensor([3.0, 4.0])
    assert rel_err(a * 1.01, a) == pytest.approx(0.01)
    assert rel_err(a, a) == 0.0
    xs = [2, 4, 8, 16]
    assert loglog_slope(xs, [x ** 1.5 for x in xs]) == pytest.approx(1.5)
    assert loglog_slope(xs, [7] * 4) == 0.0 and loglog_slope([2], [1]) is None


# ----------------------------------------------------------------------------- command lines

@dataclass
class Demo:
    preset: str = "small"
    steps: int = field(default=10, metadata=cli.option(cli.Int(1), "steps"))
    rate: float = field(default=0.5, metadata=cli.option(cli.Float(0, 1), "a rate"))
    sizes: tuple = field(default=(1, 2), metadata=cli.option(cli.Ints(1), "sizes"))
    names: tuple = field(default=("a",), metadata=cli.option(cli.Names(("a", "b")), "names"))
    limit: float | None = field(default=None, metadata=cli.option(
        cli.Optional(cli.Float(0)), "a limit", shown="no limit"))
    fast: bool = field(default=False, metadata=cli.option(cli.Flag(), "go fast"))
    out: str = field(default="runs/demo", metadata=cli.option(cli.OutDir(), "output folder"))
    hidden: int = 3

    def check(self):
        if self.steps < len(self.sizes):
            raise ValueError(f"--steps: expected at least one per size, got {self.steps}")


PRESETS = {"small": {}, "big": dict(steps=1000, sizes=(8, 16))}


def parse(argv):
    return cli.parse_config(Demo, PRESETS, argv, prog="demo", description="a demo")


def test_flags_presets_and_types():
    cfg = parse([])
    assert (cfg.steps, cfg.sizes, cfg.names, cfg.limit, cfg.fast) == (10, (1, 2), ("a",),
                                                                      None, False)
    cfg = parse(["--preset", "big", "--rate", "1", "--names", "b, a", "--limit", "2.5",
                 "--fast"])
    assert (cfg.steps, cfg.sizes, cfg.rate, cfg.names, cfg.limit, cfg.fast) == \
        (1000, (8, 16), 1.0, ("b", "a"), 2.5, True)
    assert parse(["--steps", "5", "--preset", "big"]).steps == 5     # a flag beats the preset


@pytest.mark.parametrize("argv, line", [
    (["--steps", "0"], "error: --steps: expected an int >= 1, got '0'"),
    (["--steps", "2.5"], "error: --steps: expected an int >= 1, got '2.5'"),
    (["--rate", "nan"], "error: --rate: expected a number in [0, 1], got 'nan'"),
    (["--rate", "inf"], "error: --rate: expected a number in [0, 1], got 'inf'"),
    (["--sizes", "1,-2"], "error: --sizes: expected a comma list of ints >= 1, got '1,-2'"),
    (["--sizes", ","], "error: --sizes: expected a comma list of ints >= 1, got ','"),
    (["--names", "a,c"], "error: --names: expected a comma list of a, b, got 'a,c'"),
    (["--limit", "-1"], "error: --limit: expected a number >= 0, got '-1'"),
    (["--steps", "1"], "error: --steps: expected at least one per size, got 1"),
    (["--hidden", "4"], "error: unrecognized arguments: --hidden 4"),
    (["--preset", "huge"], "error: --preset: expected one of small, big, got 'huge'"),
])
def test_a_bad_flag_is_one_line_and_status_2(argv, line, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert parse(["--out", str(tmp_path / "new" / "deeper")]).out == str(tmp_path / "new" /
                                                                          "deeper")
    assert not (tmp_path / "new").exists()                   # checking makes nothing
    for bad in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SystemExit):
            parse(["--out", str(bad)])
        assert "error: --out: expected a folder" in capsys.readouterr().err


def test_help_states_every_default_per_preset(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10 with --preset small, 1000 with --preset big)" in text
    assert "(default: 1,2 with --preset small, 8,16 with --preset big)" in text
    assert "(default: no limit)" in text and "(default: off)" in text
    assert "--hidden" not in text and "None" not in text


def test_validate_checks_a_config_built_in_code():
    cfg = Demo(steps=0)
    with pytest.raises(ValueError, match="--steps: expected an int >= 1, got 0"):
        cli.validate(cfg)
    cli.validate(Demo(sizes=[3, 4], steps="7"))              # converted in place
    cfg = Demo(sizes=[3, 4], steps="7")
    cli.validate(cfg)
    assert cfg.sizes == (3, 4) and cfg.steps == 7


def test_key_values_merge_over_the_preset_and_are_checked():
    def check(d):
        if d.get("n", 1) < 1:
            raise ValueError("n: expected >= 1")
    kv = cli.KeyValues(lambda: ["n", "name"], check)
    assert kv.from_text("n=3, name=x", {"n": 1, "name": "a"}) == {"n": 3, "name": "x"}
    with pytest.raises(ValueError, match="KEY among"):
        kv.from_text("m=3", {})
    with pytest.raises(ValueError, match="n: expected >= 1"):
        kv.from_text("n=0", {})


def test_existing_paths(tmp_path):
    (tmp_path / "f.pt").write_text("x")
    assert cli.InFile().convert(str(tmp_path / "f.pt")) == str(tmp_path / "f.pt")
    with pytest.raises(ValueError, match="expected an existing file"):
        cli.InFile().convert(str(tmp_path / "g.pt"))
    with pytest.raises(ValueError, match="holding bdh.py"):
        cli.InDir(holding="bdh.py").convert(str(tmp_path))
    with pytest.raises(ValueError, match="cpu, cuda or cuda:i"):
        cli.Device().convert("cpu:1")

"""The memory-wall CLI: JSON contract, flat BDH state, growing GPT-2 cache, OOM handling."""
import io
import json
import os
import stat

import pytest
import torch

from experiments import memory_wall

KEYS = {"model", "mode", "context", "peak_bytes", "state_bytes", "ms_per_token", "oom"}
EXTRA = {"baseline_bytes", "held_bytes", "ms_p20", "ms_p80", "timed_steps"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw")
    # Budgets far above the run's length, so a busy machine cannot cut a sweep short.
    memory_wall.main(["--max-tokens", "4096", "--decode-steps", "2", "--out", str(out),
                      "--time-budget-s", "1000", "--deadline-s", "1000"])
    return out, json.loads((out / "memory_wall.json").read_text())


def test_json_contract_and_files(run):
    out, res = run
    assert (out / "memory_wall.png").stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["memory_wall.json", "memory_wall.md",
                                                     "memory_wall.png"]      # no temp files
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():                                    # not mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    assert (out / "memory_wall.md").read_text().startswith("| model |")
    meta, points = res["meta"], res["points"]
    for key in ("device", "dtype", "torch", "transformers", "commit", "params", "stopped"):
        assert key in meta
    assert meta["params"]["bdh"] > 0
    g = meta["params"]["gpt2-sdpa"]
    assert g["total"] == g["without_position_table"] + g["position_table"]
    assert g["n_positions"] >= 4096 and g["vocab_size"] == 256
    seen = set()
    for p in points:
        assert KEYS <= set(p) <= KEYS | EXTRA
        assert p["mode"] in ("decode", "prefill") and p["oom"] is False
        assert isinstance(p["context"], int) and isinstance(p["peak_bytes"], int)
        assert p["peak_bytes"] > 0 and p["ms_per_token"] > 0
        assert p["state_bytes"] is None or isinstance(p["state_bytes"], int)
        seen.add((p["model"], p["mode"]))
    assert seen == {("bdh", "decode"), ("bdh", "prefill"), ("gpt2-sdpa", "decode"),
                    ("gpt2-sdpa", "prefill"), ("gpt2-eager", "prefill")}
    assert sorted({p["context"] for p in points}) == [1024, 2048, 4096]
    assert not meta["stopped"]


def test_bdh_state_is_flat_and_gpt2_cache_grows(run):
    _, res = run
    pts = res["points"]
    dec = {m: [p for p in pts if p["model"] == m and p["mode"] == "decode"]
           for m in ("bdh", "gpt2-sdpa")}
    assert len({p["state_bytes"] for p in dec["bdh"]}) == 1    # the same bytes at every context
    gpt = {p["context"]: p["state_bytes"] for p in dec["gpt2-sdpa"]}
    # KV cache = layers × (k, v) × context × d × 4 bytes: exactly linear in the context.
    assert gpt[2048] == 2 * gpt[1024] and gpt[4096] == 4 * gpt[1024]
    # BDH's decode peak is the worker's whole RSS (~0.25 GB of Python + torch) sampled every
    # ms; the state is 64 KiB. Across a 4x longer context it may move only by allocator and
    # sampling noise, which we bound at 15%: growth with the context would show as more.
    peaks = [p["peak_bytes"] for p in dec["bdh"]]
    assert max(peaks) < 1.15 * min(peaks)
    # GPT-2 eager materialises heads × L × L attention weights: 4x the context, >> the memory.
    eager = {p["context"]: p["peak_bytes"] for p in pts if p["model"] == "gpt2-eager"}
    assert eager[4096] - eager[1024] > 100 * 2**20


class _OomAt2048(torch.nn.Module):
    """Stands in for a model that runs out of memory past 2047 tokens."""
    def forward(self, idx, state=None, return_state=False):
        if idx.shape[1] >= 2048:
            raise MemoryError("simulated")
        return torch.zeros(1, idx.shape[1], 256), None


def test_oom_is_recorded_and_ends_the_sweep(monkeypatch):
    monkeypatch.setattr(memory_wall, "build", lambda name, cfg: _OomAt2048())
    cfg = memory_wall.WallConfig(max_tokens=8192)
    points = []
    why = memory_wall.sweep("gpt2-eager", "prefill", cfg, lambda p, c: points.append(p))
    assert [p["context"] for p in points] == [1024, 2048]
    assert [p["oom"] for p in points] == [False, True]
    assert points[1]["peak_bytes"] is None and "out of memory at 2048" in why


def test_rss_budget_counts_as_oom():
    cfg = memory_wall.WallConfig(max_tokens=2048, rss_budget_gb=0.001,
                                 bdh=memory_wall.PRESETS["cpu"]["bdh"])
    points = []
    why = memory_wall.sweep("bdh", "prefill", cfg, lambda p, c: points.append(p))
    assert [(p["context"], p["oom"]) for p in points] == [(1024, True)]
    assert "rss-budget" in why


def test_killed_worker_is_an_oom_point(monkeypatch):
    """A CPU worker killed by a signal (the OOM killer) ends its sweep with an OOM point."""
    line = json.dumps({"point": memory_wall.make_point("gpt2-eager", "prefill", 1024, 1, None,
                                                        1.0),
                       "context_peak": None})

    class Killed:
        def __init__(self, *a, **k):
            self.stdout, self.returncode = io.StringIO(line + "\n"), -9

        def wait(self):
            return self.returncode

    monkeypatch.setattr(memory_wall.subprocess, "Popen", Killed)
    points = []
    why = memory_wall.run_job_in_subprocess(memory_wall.WallConfig(max_tokens=8192),
                                            "gpt2-eager", "prefill",
                                            lambda p, c: points.append(p), 10.0)
    assert [(p["context"], p["oom"]) for p in points] == [(1024, False), (2048, True)]
    assert "signal 9" in why


def test_bad_flags_fail_clearly(capsys):
    for flags, words in ((["--max-tokens", "100"], "--max-tokens: expected an int >= 1024"),
                         (["--models", "bdhh"], "--models: expected a comma list of bdh, gpt2"),
                         (["--models", "bdh,mamba"], "got 'bdh,mamba'"),
                         (["--models", ","], "--models: expected a comma list")):
        with pytest.raises(SystemExit) as e:
            memory_wall.main(flags)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_bad_model_name_from_the_command_line_has_no_traceback(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "experiments.memory_wall", "--models", "bdhh",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("error: --models: expected a comma list of bdh, gpt2, gpt2-sdpa, "
                           "gpt2-eager, gpt2-25m, gpt2-static, got 'bdhh'\n")
    assert not any(tmp_path.iterdir())


def test_decode_is_timed_step_by_step_through_the_harness(monkeypatch):
    """Every decode point's ms/token is the median of the harness's stepwise timing, with at
    least --decode-steps steps; GPT-2's position table holds the context plus every step the
    policy may take."""
    seen = []
    real = memory_wall.time_call

    def spy(fn, device, policy):
        seen.append(policy)
        return real(fn, device, policy=policy)
    monkeypatch.setattr(memory_wall, "time_call", spy)
    cfg = memory_wall.parse(["--max-tokens", "2048", "--decode-steps", "3", "--models", "gpt2"])
    points = []
    memory_wall.sweep("gpt2-sdpa", "decode", cfg, lambda p, c: points.append(p))
    assert [p["context"] for p in points] == [1024, 2048] and len(seen) == 2
    assert all(s.stepwise and s.min_reps == 3 for s in seen)
    for p in points:
        assert 3 <= p["timed_steps"] <= seen[0].max_reps
        assert p["ms_p20"] <= p["ms_per_token"] <= p["ms_p80"]
    assert memory_wall.n_positions(cfg) == 2048 + memory_wall.decode_tokens(cfg) + 1
    assert memory_wall.decode_tokens(cfg) == cfg.decode_warmup + seen[0].warmup + seen[0].max_reps


def test_default_output_is_runs_not_the_committed_results():
    assert memory_wall.parse([]).out == "runs/memory_wall"
    assert memory_wall.WallConfig().out == "runs/memory_wall"
    assert memory_wall.parse(["--out", "results/memory_wall"]).out == "results/memory_wall"
    assert memory_wall.parse(["--models", "bdh, gpt2-25m"]).models == ("bdh", "gpt2-25m")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        memory_wall.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/memory_wall)" in text and "(default: 80% of physical memory)" in text
    assert "1024 with --preset cpu, 16384 with --preset h100" in text and "None" not in text
    for flag in ("--device", "--max-tokens", "--models", "--decode-steps", "--time-budget-s",
                 "--deadline-s", "--rss-budget-gb", "--threads", "--out", "--preset"):
        assert flag in text


def test_figure_plots_memory_above_the_baseline_in_mib(run, tmp_path):
    """The memory panel's points are peak − baseline in MiB (not the whole process), every
    size panel is in MiB, and the context axis has base-2 ticks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    _, res = run
    captured = []
    real_save = memory_wall.save_figure

    def keep(fig, path, **kw):
        captured.append(fig)
        return real_save(fig, path, **kw)
    memory_wall.save_figure = keep
    try:
        memory_wall.plot(res["points"], tmp_path / "f.png", res["meta"])
    finally:
        memory_wall.save_figure = real_save
    ax_m, ax_s, _ = captured[0].axes
    line = next(ln for ln in ax_m.get_lines() if ln.get_label() == "gpt2-eager prefill")
    want = [max((p["peak_bytes"] - p["baseline_bytes"]) / 2**20, memory_wall.FLOOR_MIB)
            for p in res["points"] if p["model"] == "gpt2-eager"]
    assert list(line.get_ydata()) == pytest.approx(want)
    assert "MiB" in ax_m.get_ylabel() and ax_s.get_ylabel() == "MiB"
    assert ax_m.xaxis.get_transform().base == 2
    plt.close(captured[0])


def test_figure_title_never_says_commit_none(run, monkeypatch):
    out, res = run
    meta = dict(res["meta"], commit=None)
    title = memory_wall.figure_title(meta, ["bdh 0.2M"])
    assert "unknown commit" in title and "None" not in title
    assert "commit abc1234" in memory_wall.figure_title(dict(meta, commit="abc1234"), [])
    # The run's own stamp: $GLASSBRAIN_COMMIT wins (device runs have no .git).
    monkeypatch.setenv("GLASSBRAIN_COMMIT", "f00dfee")
    from experiments.results import run_meta
    assert "commit f00dfee" in memory_wall.figure_title(
        dict(meta, commit=run_meta("cpu")["commit"]), [])

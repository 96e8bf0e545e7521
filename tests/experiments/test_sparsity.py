"""The sparsity experiment: JSON contract, figures, and the GPT-2 density definition."""
import json
import os
import stat
import time

import pytest
import torch

from experiments import sparsity

TEXT = (b"It is a truth universally acknowledged, that a single man. " * 150)
CORPUS = {"train": TEXT, "val": TEXT[:4000], "test": TEXT[:4000]}
SIZES = dict(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp")
    res = sparsity.main(["--steps", "12", "--record-steps", "0,5", "--out", str(out)],
                        corpus=CORPUS, bdh_sizes=SIZES)
    return out, res


def test_json_contract(run):
    out, res = run
    assert json.loads((out / "sparsity.json").read_text()) == json.loads(json.dumps(res))
    assert {"meta", "records", "loss"} <= set(res)
    names = {("bdh", n) for n in ("xs", "ys", "xy")} | {("gpt2", "mlp"),
                                                         ("gpt2", "mlp_exact_zero")}
    assert {(r["model"], r["name"]) for r in res["records"]} == names
    for r in res["records"]:
        assert set(r) == {"model", "step", "layer", "name", "density"}
        assert 0.0 <= r["density"] <= 1.0
    for m in ("bdh", "gpt2"):
        assert sorted({r["step"] for r in res["records"] if r["model"] == m}) == [0, 5, 12]
        assert {r["layer"] for r in res["records"] if r["model"] == m} == {0, 1}
        splits = {r["split"] for r in res["loss"] if r["model"] == m}
        assert splits == {"train", "val"}
    # BDH's xy = xs * ys: it can only be active where xs is.
    bdh = {(r["step"], r["layer"], r["name"]): r["density"] for r in res["records"]
           if r["model"] == "bdh"}
    for (step, layer, name), d in bdh.items():
        if name == "xy":
            assert d <= bdh[(step, layer, "xs")] + 1e-9


def test_figures_written(run):
    out, _ = run
    for name in ("sparsity_heatmaps.png", "sparsity_density.png", "sparsity_loss.png",
                 "heatmaps/step0.png", "heatmaps/step12.png"):
        assert (out / name).stat().st_size > 5_000, name
    assert (out / "sparsity.md").read_text().startswith("| model |")
    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    for p in files:                                           # not mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p


def test_density_plot_is_a_mean_over_layers_with_a_min_max_band():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [{"model": "bdh", "step": step, "layer": layer, "name": name,
                "density": d0 - 0.1 * layer - step / 100}
               for step in (0, 10) for layer in range(3)
               for name, d0 in (("xs", 0.5), ("ys", 0.45), ("xy", 0.25))]
    records += [{"model": "gpt2", "step": 0, "layer": 0, "name": "mlp", "density": 0.9}]
    bands = sparsity.density_bands(records, "bdh")
    assert list(bands) == ["xs", "ys", "xy"]
    steps, mean, lo, hi = bands["xs"]
    assert steps == [0, 10]
    assert mean == pytest.approx([0.4, 0.3]) and lo == pytest.approx([0.3, 0.2])
    assert hi == pytest.approx([0.5, 0.4])
    fig, ax = plt.subplots()
    sparsity.plot_density(ax, records, "bdh")
    lines = ax.get_lines()
    assert len(lines) == 3                                    # one per activation, not per layer
    assert [list(ln.get_ydata()) for ln in lines] == [pytest.approx(bands[n][1])
                                                       for n in bands]
    assert len(ax.collections) == 3                           # the three min-max bands
    for band, name in zip(ax.collections, bands):
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(min(bands[name][2]))
        assert ys.max() == pytest.approx(max(bands[name][3]))
    plt.close(fig)


def test_default_output_is_runs_and_every_flag_has_help(capsys):
    assert sparsity.parse([]).out == "runs/sparsity"
    with pytest.raises(SystemExit):
        sparsity.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/sparsity)" in text and "(default: <out>/ckpt)" in text
    assert "120 with --preset cpu, 3000 with --preset h100" in text and "None" not in text


def test_resume_keeps_records_and_does_not_duplicate(run, tmp_path):
    out, res = run
    again = sparsity.main(["--steps", "12", "--record-steps", "0,5", "--out", str(out),
                           "--resume"], corpus=CORPUS, bdh_sizes=SIZES)
    assert len(again["records"]) == len(res["records"])


def test_gpt2_density_definition_by_hand():
    acts = [torch.tensor([[0.0, 5e-5, -2e-4, 1.0]]), torch.tensor([[0.0, 0.0, 0.3, -0.5]])]
    stats = {(s["layer"], s["name"]): s["density"] for s in sparsity.gpt2_mlp_stats(acts)}
    assert stats[(0, "mlp")] == 0.5 and stats[(0, "mlp_exact_zero")] == 0.25
    assert stats[(1, "mlp")] == 0.5 and stats[(1, "mlp_exact_zero")] == 0.5


def test_one_deadline_for_both_models_then_resume(run, tmp_path, monkeypatch):
    """--max-minutes bounds the whole command: when the time runs out during BDH's run, the
    GPT-2 stops at once with a checkpoint; --resume then finishes with exactly the records
    and losses of the uninterrupted run."""
    from experiments import train as tr
    _, full = run

    class Clock:                        # train.py's clock; jumps an hour when GPT-2 starts
        offset = 0.0

        def time(self):
            return time.time() + self.offset

    clock = Clock()
    build = tr.build_model

    def build_and_jump(cfg):
        if cfg.model == "gpt2":
            clock.offset = 3600.0
        return build(cfg)

    monkeypatch.setattr(tr, "time", clock)
    monkeypatch.setattr(tr, "build_model", build_and_jump)
    args = ["--steps", "12", "--record-steps", "0,5", "--out", str(tmp_path), "--max-minutes", "30"]
    part = sparsity.main(args, corpus=CORPUS, bdh_sizes=SIZES)
    assert part["meta"]["bdh_status"] == "finished"
    assert part["meta"]["gpt2_status"] == "interrupted"
    assert {r["model"] for r in part["records"]} == {"bdh"}
    assert (tmp_path / "sparsity.md").exists()                       # partial table written
    assert (tmp_path / "sparsity_density.png").exists()
    monkeypatch.setattr(tr, "time", time)
    done = sparsity.main(args[:-2] + ["--resume"], corpus=CORPUS, bdh_sizes=SIZES)
    assert done["meta"]["gpt2_status"] == "finished"

    def key(r):
        return (r["model"], r["step"], r["layer"], r["name"])

    assert sorted(done["records"], key=key) == sorted(full["records"], key=key)
    assert sorted(done["loss"], key=lambda r: (r["model"], r["split"], r["step"])) == \
        sorted(full["loss"], key=lambda r: (r["model"], r["split"], r["step"]))


@pytest.mark.parametrize("flags, words", [
    (["--models", "bdh,mamba"], "--models: expected a comma list of bdh, gpt2"),
    (["--record-steps", "0,ten"], "--record-steps: expected a comma list of ints >= 0"),
    (["--record-steps", "-5"], "--record-steps: expected a comma list of ints >= 0, got '-5'"),
    (["--steps", "0"], "--steps: expected an int >= 1, got '0'"),
    (["--bdh", "n_head=3"], "--bdh: "),
])
def test_bad_flags_fail_clearly(tmp_path, flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        sparsity.main(flags + ["--out", str(tmp_path / "out")], corpus=CORPUS)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and not (tmp_path / "out").exists(), err


def test_default_record_steps_spread_over_the_run():
    assert sparsity.default_record_steps(120) == [0, 30, 60, 120]
    assert sparsity.default_record_steps(3000) == [0, 100, 500, 3000]


def test_resume_without_checkpoints_records_afresh(run, tmp_path):
    """--resume into a DIR whose sparsity.json has no checkpoints beside it (a committed
    result) must not take the old records as done."""
    out, full = run
    stale = json.loads((out / "sparsity.json").read_text())
    for r in stale["records"]:
        r["density"] = -1.0                                   # marks the stale records
    (tmp_path / "sparsity.json").write_text(json.dumps(stale))
    res = sparsity.main(["--steps", "12", "--record-steps", "0,5", "--out", str(tmp_path),
                         "--models", "gpt2", "--resume"], corpus=CORPUS, bdh_sizes=SIZES)
    gpt2 = [r for r in res["records"] if r["model"] == "gpt2"]
    assert gpt2 == [r for r in full["records"] if r["model"] == "gpt2"]

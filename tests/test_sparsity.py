"""The sparsity experiment: JSON contract, figures, and the GPT-2 density definition."""
import json

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

"""experiments.routing_map: the per-query routing weights against the routing formula, the
attention rows, the scores in the titles, a tiny run's PNG / JSON, refusals."""
import json
import math

import pytest
import torch

from experiments import routing_map as rm
from helpers import assert_rel_close

TINY = ["--vocab", "32", "--d-model", "8", "--n-head", "2", "--chunk", "8", "--steps", "2",
        "--batch-size", "2", "--length", "64", "--pairs", "12", "--bank", "2,1"]


def tiny_models(tmp_path):
    cfg = rm.config_from_args(TINY + ["--out", str(tmp_path)])
    return cfg, {m: rm.get_model(cfg, m) for m in rm.MIXERS}


def test_routing_weights_follow_the_routing_formula(tmp_path):
    """Query t of chunk c reads chunks j < c with p = softmax_j(r_t · mean_{s in j} hk_s / √M):
    the per-query bsbr_attention calls give exactly that (dense routing), and nothing at or
    after the query's chunk."""
    cfg, models = tiny_models(tmp_path)
    attn = models["bsbr"].blocks[0].mixer
    with torch.no_grad():
        for W in (attn.W_r, attn.W_h):
            W.weight.normal_(std=1.0)                      # far from uniform routing
    h = torch.randn(1, 64, 8)
    queries = torch.tensor([3, 9, 23, 40, 63])
    w = rm.routing_weights(attn, h, queries)
    assert w.shape == (2, 5, 8)
    r, hk = rm.split(attn.W_r(h), 2), rm.split(attn.W_h(h), 2)
    M = hk.shape[-1]
    means = hk[0].view(2, 8, 8, M).mean(2)                             # [H, chunks, M]
    for i, t in enumerate(queries.tolist()):
        c = t // 8
        assert (w[:, i, c:] == 0).all()
        if c == 0:
            continue
        scores = torch.einsum("hm,hjm->hj", r[0, :, t], means[:, :c]) / math.sqrt(M)
        ref = torch.softmax(scores, -1)
        assert_rel_close(w[:, i, :c], ref.detach(), 1e-5, f"routing of query {t}")


def test_softmax_rows_are_causal_distributions(tmp_path):
    _, models = tiny_models(tmp_path)
    attn = models["softmax"].blocks[1].mixer
    queries = torch.tensor([0, 5, 31, 63])
    s = rm.softmax_weights(attn, torch.randn(1, 64, 8), queries)
    assert s.shape == (2, 4, 64)
    assert_rel_close(s.sum(-1), torch.ones(2, 4), 1e-6, "rows sum to 1")
    for i, t in enumerate(queries.tolist()):
        assert (s[:, i, t + 1:] == 0).all() and (s[:, i, :t + 1] > 0).all()


def test_found_counts_a_clear_winner_not_a_tie():
    w = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    target = torch.tensor([0, 1, 1, 0])
    valid = torch.tensor([True, True, True, False])
    f = rm.found(w, target, valid)
    assert f["found"] == [pytest.approx(1 / 3)]                # the tie at query 0 is no hit
    assert f["mass"] == [pytest.approx((0.5 + 0.8 + 0.3) / 3)]
    uni = rm.uniform_mass(torch.tensor([20, 33]), torch.tensor([3, 17]), 8,
                          torch.tensor([True, True]))
    assert uni["bsbr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert uni["softmax"] == pytest.approx((8 / 21 + 8 / 34) / 2)


def test_tiny_run_writes_the_picture(tmp_path):
    data = rm.main(TINY + ["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "routing_map.json").read_text())
    assert saved["queries"] == data["queries"] and len(saved["layers"]) == 2
    assert len(data["queries"]) == 12 == len(data["answer"])
    for L in saved["layers"]:
        assert len(L["routing"]) == 2 and len(L["routing"][0]) == len(data["queries"])
        assert sum(L["bank"]["counts"]) == 8                 # 64 tokens in chunks of 8
        assert len(L["bank"]["salience"][0]) == len(L["bank"]["levels"])
    assert (tmp_path / "routing_map.png").stat().st_size > 20_000


def test_a_checkpoint_of_the_wrong_mixer_is_refused(tmp_path, capsys):
    tiny_models(tmp_path)
    wrong = tmp_path / "train" / "softmax" / "ckpt" / "state.pt"
    with pytest.raises(SystemExit) as exc:
        rm.main(TINY + ["--bsbr-checkpoint", str(wrong), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--bsbr-checkpoint: expected a checkpoint of the bsbr mixer" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        rm.main(TINY + ["--bank", "1,1", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()

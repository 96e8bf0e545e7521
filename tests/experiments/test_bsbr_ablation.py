"""experiments.bsbr_ablation: the banks it compares, streamed scoring against one call, a tiny
run's JSON / Markdown / PNG contract, and refusals before any work."""
import json

import pytest
import torch

from experiments import bsbr_ablation as ba
from helpers import assert_rel_close

TINY = ["--chunks", "8,16", "--bank-divisors", "2,4,8", "--curriculum", "cpu",
        "--eval-lengths", "32,64", "--eval-pairs", "6", "--vocab", "32", "--d-model", "8",
        "--n-head", "2", "--n-layer", "1", "--steps", "2", "--batch-size", "2",
        "--eval-batch", "3"]


def test_bank_slots_and_the_banks_compared():
    assert [ba.bank_slots(c) for c in (2, 4, 5, 8, 9)] == [(1,), (3,), (2, 2), (4, 3), (4, 4)]
    cfg = ba.config_from_args(TINY + ["--eval-lengths", "32,128"])
    # 16 chunks of 8 at T = 128: 8, 4 and 2 slots; 8 chunks of 16: 4 and 2 (8 slots is exact)
    assert ba.banks_for(cfg, 8) == [None, (4, 3), (3,), (1,)]
    assert ba.banks_for(cfg, 16) == [None, (3,), (1,)]
    assert ba.banks_for(cfg, 128) == [None]            # one chunk: nothing to compress


def test_streamed_exact_bank_equals_one_call_and_a_bounded_bank_differs():
    """Scoring streams one chunk at a time: with the exact bank that is the model's own
    single-call forward; a bank smaller than the chunks merges and changes the logits."""
    cfg = ba.config_from_args(TINY)
    torch.manual_seed(0)
    model = ba.lr.build_model(ba.long_range_config(cfg, 8), "bsbr").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))          # routing far from uniform
        x = torch.randint(0, 32, (2, 64))
        full, _ = model(x)
    exact, st = ba.streamed(ba.with_bank(model, None), x, 8)
    assert_rel_close(exact, full, 1e-5, "streamed, exact bank")
    small, st_small = ba.streamed(ba.with_bank(model, (1,)), x, 8)
    assert (small - full).abs().max() > 1e-3
    assert st_small.nbytes() < st.nbytes()
    bank = st_small.layers[0].mixer.bank
    assert bank.n_chunks == 8 and bank.n == 2                # 8 chunks in one slot + archive


def test_tiny_run_writes_one_table_and_a_plot(tmp_path):
    res = ba.main(TINY + ["--out", str(tmp_path)])
    data = json.loads((tmp_path / "bsbr_ablation.json").read_text())
    assert data["rows"] == json.loads(json.dumps(res["rows"]))
    banks = [(r["chunk"], r["bank"]) for r in data["rows"]]
    assert banks == [(8, "exact"), (8, "3"), (8, "1"), (16, "exact"), (16, "1")]
    for r in data["rows"]:
        for L in (32, 64):
            assert 0.0 <= r[f"acc T={L}"] <= 1.0 and r[f"loss T={L}"] > 0
        assert r["fwd+bwd ms"] > 0 and r["steps"] == 2 and r["state bytes"] > 0
    by = {(r["chunk"], r["bank"]): r for r in data["rows"]}
    # a bounded bank's state is smaller than the exact bank's at the longest length
    assert by[(8, "1")]["state bytes"] < by[(8, "3")]["state bytes"] < \
        by[(8, "exact")]["state bytes"]
    for C in (8, 16):
        assert (tmp_path / f"chunk{C}" / "bsbr" / "ckpt" / "state.pt").is_file()
    md = (tmp_path / "bsbr_ablation.md").read_text()
    assert "| chunk | bank | slots | acc T=32 | loss T=32 |" in md
    assert (tmp_path / "bsbr_ablation.png").stat().st_size > 5_000


@pytest.mark.parametrize("flags,message", [
    (["--chunks", "0"], "--chunks: expected a comma list of ints >= 1"),
    (["--bank-divisors", "1"], "--bank-divisors: expected a comma list of ints >= 2"),
    (["--eval-pairs", "40"], "--eval-pairs: MQAR at length 32 with vocab 32 holds at most"),
    (["--d-model", "9"], "--d-model: expected a multiple of --n-head"),
])
def test_bad_flags_stop_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        ba.main(TINY + flags + ["--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

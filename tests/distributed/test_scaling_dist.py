"""experiments.scaling_dist: a tiny run on 1 and 2 CPU processes writes the JSON / Markdown /
PNG contract; the efficiency and the longest sequence per device count are read off right."""
import json

import pytest

from experiments import scaling_dist as sd

TINY = ["--bdh", "n_layer=1,n_embd=16,n_head=2,mlp_internal_dim_multiplier=4",
        "--rank-batch", "2", "--block-size", "16", "--steps", "1", "--cp-lengths", "64,96",
        "--cp-heads", "2", "--cp-neurons", "16", "--cp-dim", "8", "--cp-reps", "1"]


def test_tiny_run_writes_the_contract(tmp_path):
    sd.main(TINY + ["--worlds", "2", "--out", str(tmp_path)])
    res = sd.main(TINY + ["--worlds", "1", "--append", "--out", str(tmp_path)])   # split runs
    assert len(res["meta"]["earlier_runs"]) == 1
    on_disk = json.loads((tmp_path / "scaling_dist.json").read_text())
    assert on_disk["train"] == json.loads(json.dumps(res["train"]))
    assert [p["world"] for p in on_disk["train"]] == [1, 2]
    for p in on_disk["train"]:
        assert p["tok_s"] > 0 and p["step_ms"] > 0 and p["peak_bytes"] > 0
    one, two = on_disk["train"]
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["tok_s"] / (2 * one["tok_s"]))
    got = {(p["world"], p["T"]): p for p in on_disk["cp"]}
    assert set(got) == {(w, T) for w in (1, 2) for T in (64, 96)}
    assert got[(2, 96)]["tokens_per_rank"] == 48 and not any(p["oom"] for p in got.values())
    text = (tmp_path / "scaling_dist.md").read_text()
    assert "Weak scaling" in text and "Longest sequence" in text
    assert (tmp_path / "scaling_dist.png").stat().st_size > 0


def test_longest_sequence_per_device_count():
    points = [{"world": 1, "T": 64, "ms": 1.0}, {"world": 1, "T": 128, "ms": None, "oom": True},
              {"world": 2, "T": 64, "ms": 1.0}, {"world": 2, "T": 128, "ms": 2.0}]
    assert sd.longest(points) == {1: {"longest_T": 64, "first_failed_T": 128},
                                  2: {"longest_T": 128, "first_failed_T": None}}


def test_efficiency_is_relative_to_one_device():
    train = [{"world": 1, "tok_s": 100.0}, {"world": 4, "tok_s": 300.0},
             {"world": 8, "tok_s": None, "oom": True}]
    sd.add_efficiency(train)
    assert [p["efficiency"] for p in train] == [1.0, 0.75, None]

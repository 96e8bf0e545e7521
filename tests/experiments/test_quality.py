"""experiments.quality: three models trained on the same bytes, curves in JSON/MD/PNG."""
import json

import pytest

from experiments import quality


def _corpus():
    text = bytes(range(32, 127)) * 60
    return {"train": text, "val": text[::-1], "test": text}


def test_three_models_same_steps_and_a_figure(tmp_path):
    res = quality.main(["--steps", "4", "--eval-every", "2", "--out", str(tmp_path)],
                       corpus=_corpus())
    data = json.loads((tmp_path / "quality.json").read_text())
    assert list(data["models"]) == ["bsbr", "bdh", "gpt2"] == list(res["models"])
    for name, r in data["models"].items():
        assert r["status"] == "finished", name
        assert [e["step"] for e in r["val"]] == [0, 2, 4], name
        assert all(e["loss"] > 0 for e in r["val"] + r["train"]), name
    # parameter-matched to BDH within 20%
    bdh = data["models"]["bdh"]["params"]
    for name in ("bsbr", "gpt2"):
        assert abs(data["models"][name]["params"] - bdh) / bdh < 0.2, name
    assert (tmp_path / "quality.png").stat().st_size > 1000
    assert (tmp_path / "bsbr" / "ckpt").is_dir()


def test_bad_model_name_exits_with_the_list(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--models", "bsbr,nope"])
    assert "nope" in capsys.readouterr().err

"""experiments.gpt2_decode on the CPU: every variant timed, a profile table, JSON/MD/PNG."""
import json

import pytest

from experiments import gpt2_decode


def test_cpu_run_writes_every_variant_and_a_profile(tmp_path):
    res = gpt2_decode.main(["--contexts", "16,40", "--steps", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpt2_decode.json").read_text())
    assert data["rows"] == json.loads(json.dumps(res["rows"]))
    want = {(P, v) for P in (16, 40) for v in gpt2_decode.PRESETS["cpu"]["variants"]}
    assert {(r["context"], r["variant"]) for r in data["rows"]} == want
    assert all(r["ms/token"] and r["ms/token"] > 0 for r in data["rows"]), data["rows"]
    assert data["profile"] and all(r["calls"] >= 1 for r in data["profile"])
    assert (tmp_path / "gpt2_decode.png").stat().st_size > 1000
    assert "| context |" in (tmp_path / "gpt2_decode.md").read_text()


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        gpt2_decode.main(["--contexts", "1k"])
    assert "--contexts" in capsys.readouterr().err

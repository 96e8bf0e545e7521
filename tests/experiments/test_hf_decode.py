"""experiments.hf_decode on the CPU: every implementation, batch and context measured through
generate (prefill, ms/token, stall, peak memory), JSON/MD/PNG written, --append adds rows,
--batch-tokens skips points, and bad arguments stop it before any work."""
import json

import pytest

from experiments import hf_decode

SMALL = ["--contexts", "20,36", "--batches", "1,2", "--new-tokens", "2", "--reps", "1",
         "--chunk-size", "8", "--top-k", "2", "--bank", "2,2"]


def test_cpu_run_measures_every_point_and_writes_its_files(tmp_path):
    res = hf_decode.main(SMALL + ["--models", "llama", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "hf_decode.json").read_text())
    assert data["rows"] == json.loads(json.dumps(res["rows"]))
    impls = hf_decode.HFDecodeConfig().impls
    want = {(i, b, c) for i in impls for b in (1, 2) for c in (20, 36)}
    assert {(r["impl"], r["batch"], r["context"]) for r in data["rows"]} == want
    for r in data["rows"]:
        # a difference of two wall-clock medians: on a busy CPU it may come out <= 0
        assert r["prefill ms"] > 0 and isinstance(r["ms/token"], float) and r["peak MiB"] > 0
        if r["ms/token"] > 0:
            assert r["tok/s"] == pytest.approx(r["batch"] * 1e3 / r["ms/token"])
        assert isinstance(r["stall ms"], float) and r["note"] == ""
        assert (r["captures"] is None) == (not r["impl"].endswith("/graph")), r
    assert (tmp_path / "hf_decode.png").stat().st_size > 1000
    assert "| model | impl |" in (tmp_path / "hf_decode.md").read_text()


def test_append_adds_rows_and_batch_tokens_skips_points(tmp_path):
    base = SMALL + ["--impls", "hebbian/graph", "--out", str(tmp_path)]
    hf_decode.main(base + ["--models", "gpt2", "--batch-tokens", "40"])
    rows = json.loads((tmp_path / "hf_decode.json").read_text())["rows"]
    assert {(r["batch"], r["context"]) for r in rows} == {(1, 20), (1, 36), (2, 20)}
    hf_decode.main(base + ["--models", "llama", "--contexts", "20", "--batches", "1",
                           "--append"])
    rows = json.loads((tmp_path / "hf_decode.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["gpt2"] * 3 + ["llama"]


@pytest.mark.parametrize("argv,words", [
    (["--contexts", "1"], "--contexts: expected a comma list of ints >= 2"),
    (["--impls", "flash"], "--impls: expected a comma list of sdpa/dynamic"),
    (["--models", "gpt3"], "--models: expected a comma list of gpt2, llama"),
    (["--chunk-size", "300"], "--chunk-size: expected an int in [1, 256]"),
    (["--bank", "1,1"], "--bank: BankConfig.slots_per_level[0]"),
    (["--impls", "sdpa/static"], "--impls: sdpa/static compiles with inductor"),
    (["--device", "cuda:x"], "--device: expected cpu, cuda or cuda:i"),
    (["--deadline-s", "-1"], "--deadline-s: expected a number >= 0"),
])
def test_bad_arguments_exit_with_one_line(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        hf_decode.main(argv + ["--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and words in err, err
    assert not (tmp_path / "never").exists()

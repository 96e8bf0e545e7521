"""Result writing: atomic files and Markdown tables."""
import json

import pytest
import torch

from experiments.results import markdown_table, run_meta, save_torch, write_json


def test_write_json_is_atomic_and_readable(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"a": 1.5, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]      # no temp file left


def test_failed_write_keeps_old_file(tmp_path):
    path = write_json(tmp_path / "r.json", {"v": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_torch({"x": Boom()}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_save_torch_roundtrip(tmp_path):
    t = torch.randn(3, 4)
    save_torch({"t": t}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["t"], t)


def test_markdown_table_and_meta():
    table = markdown_table([{"model": "bdh", "ms": 1.23456, "oom": None}])
    assert table.splitlines()[0] == "| model | ms | oom |"
    assert "1.235" in table and "–" in table
    meta = run_meta("cpu", preset="tiny")
    assert meta["preset"] == "tiny" and meta["torch"] == torch.__version__

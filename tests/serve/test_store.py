"""serve.store: session files round-trip, the index catches up after a crash between the two
writes, untrusted records are refused, and the LRU moves states device → host → dropped."""
import json
import time

import pytest
import torch

from serve.store import SessionRecord, SessionStore, StateCache, record_from_dict


def record(sid="a" * 32, **kw):
    return SessionRecord(id=sid, created=1.0, last_active=2.0, model="m", **kw)


def payload():
    return {"kind": "bdh", "position": 7, "tensors": [torch.randn(1, 2, 9, 5), torch.zeros(3)]}


def test_save_load_round_trip(tmp_path):
    store = SessionStore(tmp_path, "zlib")
    rec = record(tokens_seen=7, calls=1, pending=[65], keep_text=True, text="héllo".encode())
    p = payload()
    size = store.save(rec, p)
    got_rec, got = store.load(rec.id)
    assert size == rec.stored_bytes == got_rec.stored_bytes > 0
    assert got_rec.text == "héllo".encode() and got_rec.pending == [65]
    assert got["position"] == 7
    for a, b in zip(got["tensors"], p["tensors"]):
        assert torch.equal(a, b)
    assert store.load("b" * 32) is None
    store.close()


def test_index_catches_up_with_a_newer_file(tmp_path):
    store = SessionStore(tmp_path)
    rec = record(tokens_seen=3)
    store.save(rec, payload())
    newer = record(tokens_seen=9, calls=2)
    time.sleep(0.01)
    # the file of a later call, written just before a crash (its index row never was)
    from glassbrain.atomic_file import load_checked, save_checked
    body = load_checked(store.path(rec.id))
    body["record"] = newer.to_dict()
    save_checked(body, store.path(rec.id))
    store.close()
    again = SessionStore(tmp_path)
    (got,) = again.records()
    assert got.tokens_seen == 9 and got.calls == 2
    again.close()


@pytest.mark.parametrize("field,value", [("tokens_seen", -1), ("calls", "3"), ("pending", [300]),
                                         ("id", "c" * 32), ("keep_text", 1), ("created", None)])
def test_bad_records_are_refused(field, value):
    d = record().to_dict()
    d[field] = value
    with pytest.raises(ValueError, match="session"):
        record_from_dict(d, "a" * 32)


def test_delete_removes_file_and_row(tmp_path):
    store = SessionStore(tmp_path)
    rec = record()
    store.save(rec, payload())
    store.delete(rec.id)
    assert not store.path(rec.id).exists() and store.records() == []
    store.close()


def test_lru_moves_states_to_host_then_drops_them():
    moved = []

    def to(state, device):
        moved.append(device)
        return state

    cache = StateCache("cpu", device_limit=2, host_limit=1, to_device=to)
    for k in "abcd":
        cache.put(k, k.upper())
    # d, c on the device; b pushed to the host; a pushed out of the host (dropped)
    assert [cache.where(k) for k in "abcd"] == ["disk", "host", "device", "device"]
    assert cache.counts()["to_host"] == 2 and cache.counts()["dropped"] == 1
    assert cache.take("b") == "B" and moved[-1] == torch.device("cpu")
    assert cache.where("b") == "disk" and cache.take("a") is None
    with pytest.raises(ValueError, match="device_limit"):
        StateCache("cpu", -1, 0, to)


def test_index_rows_are_json(tmp_path):
    store = SessionStore(tmp_path)
    store.create(record())
    row = store._db.execute("SELECT record FROM sessions").fetchone()[0]
    assert json.loads(row)["id"] == "a" * 32 and "text" not in json.loads(row)
    store.close()

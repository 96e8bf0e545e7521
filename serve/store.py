"""Where session states live: files on disk (the truth), an SQLite index, and an LRU of states
kept in device and host memory.

Disk: one file per session, ``<state_dir>/states/<id>.state``, written by
`glassbrain.atomic_file.save_checked` (a temporary file, fsync'ed, renamed; a sha256 over the
content) after every completed call, so a `kill -9` at any moment leaves either the previous
call's file or the new one. It holds the session's record (counts, the pending token, the text
only when the caller asked to keep it) and the model state, encoded by `serve.codec`. Files are
untrusted input: `load_checked` (weights_only) verifies the checksum and the record's fields are
type-checked here; the model adapter checks the state's structure.

Index: ``<state_dir>/sessions.sqlite`` lists the sessions (id, creation time, the record as of
the last save, the file's mtime), so a restarted server knows its sessions without opening every
state file. The file is written before the index, so after a crash between the two the file is
newer: `SessionStore.records` notices (mtime) and reads the record from the file.

Memory: `StateCache` keeps the states of idle sessions, most recently used first, on the device
(at most ``device_limit``), then in host memory (at most ``host_limit``); a state pushed out of
both is simply dropped, since its file is current. A session that comes back is found in
memory or read from its file, transparently.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from glassbrain.atomic_file import load_checked, save_checked

from .codec import CODECS, decode_tensor, encode_tensor

FILE_FORMAT = "glassbrain.serve_session"
FILE_VERSION = 1


@dataclasses.dataclass
class SessionRecord:
    """What the server remembers about a session besides its model state. ``pending``: the
    last sampled token, which the state has not consumed yet (it leads the next call's input).
    ``text``: every byte the session has seen, only when ``keep_text``."""
    id: str
    created: float
    last_active: float
    model: str
    tokens_seen: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    keep_text: bool = False
    pending: list = dataclasses.field(default_factory=list)
    text: bytes | None = None
    stored_bytes: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_RECORD_TYPES = {"id": str, "created": float, "last_active": float, "model": str,
                 "tokens_seen": int, "prompt_tokens": int, "completion_tokens": int,
                 "calls": int, "keep_text": bool, "pending": list, "stored_bytes": int}


def record_from_dict(d, session_id: str) -> SessionRecord:
    """A SessionRecord from an untrusted dict (a state file's or the index's)."""
    if not isinstance(d, dict):
        raise ValueError(f"session {session_id}: record is not a dict")
    for key, typ in _RECORD_TYPES.items():
        v = d.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else (
            isinstance(v, typ) and (typ is bool or not isinstance(v, bool)))
        if not ok or (typ is int and v < 0):
            raise ValueError(f"session {session_id}: record field {key!r} = {v!r} is not a "
                             f"valid {typ.__name__}")
    if d["id"] != session_id:
        raise ValueError(f"session {session_id}: the file belongs to session {d['id']!r}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256
               for t in d["pending"]) or len(d["pending"]) > 1:
        raise ValueError(f"session {session_id}: bad pending tokens {d['pending']!r}")
    text = d.get("text")
    if text is not None and not isinstance(text, bytes):
        raise ValueError(f"session {session_id}: text is not bytes")
    fields = {k: d[k] for k in _RECORD_TYPES}
    fields["created"], fields["last_active"] = float(d["created"]), float(d["last_active"])
    return SessionRecord(**fields, text=text)


def _encode_tree(obj, codec: str):
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": encode_tensor(obj, codec)}
    if isinstance(obj, dict):
        return {k: _encode_tree(v, codec) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode_tree(v, codec) for v in obj]
    return obj


def _decode_tree(obj, depth: int = 0):
    if depth > 16:
        raise ValueError("state payload: nested too deeply")
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return decode_tensor(obj["__tensor__"])
        return {k: _decode_tree(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_tree(v, depth + 1) for v in obj]
    return obj


class SessionStore:
    """State files and the SQLite index under ``root`` (see the module docstring)."""

    def __init__(self, root, codec: str = "zlib"):
        if codec not in CODECS:
            raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
        self.root = Path(root)
        self.codec = codec
        self.states = self.root / "states"
        self.states.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "sessions.sqlite", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, "
                         "record TEXT NOT NULL, mtime_ns INTEGER NOT NULL DEFAULT 0)")

    def path(self, session_id: str) -> Path:
        return self.states / f"{session_id}.state"

    def _index(self, rec: SessionRecord, mtime_ns: int) -> None:
        meta = rec.to_dict()
        meta.pop("text")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions (id, record, mtime_ns) "
                             "VALUES (?, ?, ?)", (rec.id, json.dumps(meta), mtime_ns))

    def create(self, rec: SessionRecord) -> None:
        self._index(rec, 0)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        self.path(session_id).unlink(missing_ok=True)

    def save(self, rec: SessionRecord, state_payload: dict) -> int:
        """Write the session's file (record + encoded state), then its index row. Returns the
        file's size in bytes (also stored in ``rec.stored_bytes``)."""
        body = {"format": FILE_FORMAT, "version": FILE_VERSION,
                "record": rec.to_dict(), "state": _encode_tree(state_payload, self.codec)}
        path = self.path(rec.id)
        save_checked(body, path)
        st = path.stat()
        rec.stored_bytes = st.st_size
        self._index(rec, st.st_mtime_ns)
        return st.st_size

    def load(self, session_id: str):
        """(record, state payload) from the session's file, or None when it has none yet."""
        path = self.path(session_id)
        if not path.exists():
            return None
        body = load_checked(path, "session state", map_location="cpu",
                            fix="delete the session (DELETE /v1/sessions/<id>) and start anew")
        if not isinstance(body, dict) or body.get("format") != FILE_FORMAT \
                or body.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: not a session state file of version {FILE_VERSION}")
        rec = record_from_dict(body.get("record"), session_id)
        rec.stored_bytes = path.stat().st_size
        return rec, _decode_tree(body.get("state"))

    def records(self) -> list[SessionRecord]:
        """Every indexed session's record; where the file is newer than the index (a crash
        between the two writes), the file's record."""
        with self._lock:
            rows = self._db.execute("SELECT id, record, mtime_ns FROM sessions").fetchall()
        out = []
        for sid, meta, mtime_ns in rows:
            rec = record_from_dict(json.loads(meta), sid)
            path = self.path(sid)
            if path.exists() and path.stat().st_mtime_ns != mtime_ns:
                loaded = self.load(sid)
                if loaded is not None:
                    rec = loaded[0]
                    self._index(rec, path.stat().st_mtime_ns)
            out.append(rec)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


class StateCache:
    """Idle sessions' states in memory: an LRU on ``device`` (``device_limit`` states), then an
    LRU in host memory (``host_limit``); see the module docstring. Thread-safe."""

    def __init__(self, device, device_limit: int, host_limit: int, to_device):
        for name, v in (("device_limit", device_limit), ("host_limit", host_limit)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        self.device = torch.device(device)
        self.device_limit, self.host_limit = device_limit, host_limit
        self._to = to_device
        self._dev: OrderedDict = OrderedDict()
        self._host: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.moves = {"to_host": 0, "dropped": 0, "from_host": 0}

    def put(self, key: str, state) -> None:
        with self._lock:
            self._host.pop(key, None)
            self._dev[key] = state
            self._dev.move_to_end(key)
            while len(self._dev) > self.device_limit:
                k, s = self._dev.popitem(last=False)
                if self.host_limit:
                    self._host[k] = self._to(s, "cpu")
                    self.moves["to_host"] += 1
                else:
                    self.moves["dropped"] += 1
            while len(self._host) > self.host_limit:
                self._host.popitem(last=False)
                self.moves["dropped"] += 1

    def take(self, key: str):
        """The state of ``key`` on the device (removed from the cache: the caller owns it while
        it works on it), or None when only its file has it."""
        with self._lock:
            if key in self._dev:
                return self._dev.pop(key)
            if key in self._host:
                self.moves["from_host"] += 1
                return self._to(self._host.pop(key), self.device)
        return None

    def drop(self, key: str) -> None:
        with self._lock:
            self._dev.pop(key, None)
            self._host.pop(key, None)

    def where(self, key: str) -> str:
        with self._lock:
            return "device" if key in self._dev else "host" if key in self._host else "disk"

    def counts(self) -> dict:
        with self._lock:
            return {"device": len(self._dev), "host": len(self._host), **self.moves}

"""The engine: sessions, the batch of states, the decode loop with continuous batching.

It knows nothing of HTTP; `serve.api` is a thin layer over it, and tests drive it directly:

    engine = Engine(adapter, EngineConfig(state_dir="states")).start()
    sid = engine.create_session().id
    call = engine.submit(sid, b"Once upon a time", SamplingParams(max_tokens=20, temperature=0))
    for event in call:                 # {"type": "token", "text": ...}, then "done" or "error"
        ...
    engine.shutdown()

One worker thread owns the model. Each turn it admits waiting calls (loads the session's state:
from the device LRU, host memory or disk; consumes the new text in one prefill) and then steps
every running call by one token. Running calls whose states the adapter can batch (equal
`batch_key`) form a group stepped by one model call on one batched state; calls join and leave
it between steps (`adapter.join` / `adapter.leave`), and a stable batch stays as it is.

A call's work happens on a copy: the session's committed state changes only when the call
completes, after its new state has been written to disk (`serve.store`); only then is the
"done" event sent. A call that fails or is cancelled leaves the session as it was. A session
runs one call at a time (a second one is refused with SessionBusy).

The last sampled token of a call is not fed to the model (nothing reads its logits): it waits
in the session's ``pending`` list and leads the next call's input, so `tokens_seen` counts it.
"""
from __future__ import annotations

import asyncio
import codecs
import collections
import dataclasses
import queue
import secrets
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch

from glassbrain.sampling import sample_next

from .models import ModelAdapter, kv_cache_bytes
from .store import SessionRecord, SessionStore, StateCache


PERSIST_WORKERS = 4


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status the API answers with."""
    status = 400

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(EngineError):
    status = 400


class UnknownSession(EngineError):
    status = 404


class SessionBusy(EngineError):
    status = 409


class TooBusy(EngineError):
    status = 429


@dataclasses.dataclass
class EngineConfig:
    """Limits and places. ``max_active``: calls running or waiting at once (one batch row
    each); ``device_sessions`` / ``host_sessions``: idle states kept in device / host memory
    (the rest are read back from disk when used); ``codec``: how states are stored
    (`serve.codec`); ``observe``: record the dashboard's per-token view of the model;
    ``persist``: False keeps states in memory only (benchmarks: nothing survives a restart)."""
    state_dir: str = "runs/serve/state"
    codec: str = "zlib"
    max_sessions: int = 10_000
    max_active: int = 64
    max_prompt_tokens: int = 65_536
    max_new_tokens: int = 4096
    device_sessions: int = 32
    host_sessions: int = 256
    prefill_chunk: int = 4096
    observe: bool = True
    persist: bool = True

    def __post_init__(self):
        for name in ("max_sessions", "max_active", "max_prompt_tokens", "max_new_tokens",
                     "prefill_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name}: expected an int >= 1, got {v!r}")


@dataclasses.dataclass
class SamplingParams:
    """max_tokens: tokens to generate (0: only consume the prompt). temperature 0 (or top_k 1)
    is greedy. seed: a reproducible draw. stop: byte strings that end the generation (the
    returned text stops before them; the session's state has consumed them)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple = ()

    def check(self, max_new_tokens: int) -> None:
        m = self.max_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= max_new_tokens:
            raise BadRequest(f"max_tokens: expected an int in [0, {max_new_tokens}], got {m!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 100:
            raise BadRequest(f"temperature: expected a number in [0, 100], got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise BadRequest(f"top_k: expected None or an int >= 1, got {k!r}")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise BadRequest(f"seed: expected None or an int, got {self.seed!r}")
        if not all(isinstance(s, bytes) and 0 < len(s) <= 64 for s in self.stop) \
                or len(self.stop) > 4:
            raise BadRequest(f"stop: expected at most 4 non-empty strings of at most 64 bytes, "
                             f"got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Call:
    """One generate call: the events it produces, in order, for a blocking reader (iterate it)
    or an asyncio one (``async for event in call.events()``, with ``loop`` given)."""

    def __init__(self, session_id, prompt: bytes, params: SamplingParams, loop=None):
        self.id = secrets.token_hex(12)
        self.session_id = session_id
        self.prompt = prompt
        self.params = params
        self.cancelled = threading.Event()
        self.finished = False
        self._loop = loop
        self._queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def emit(self, event: dict) -> None:
        if event["type"] != "token":
            self.finished = True
        if self._loop is None:
            self._queue.put(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:            # the loop is gone: nobody is listening any more
                pass

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if event["type"] != "token":
                return

    async def events(self):
        while True:
            event = await self._queue.get()
            yield event
            if event["type"] != "token":
                return

    def result(self) -> dict:
        """Block until the call ends: {"text", "finish_reason", "usage", ...} or raise the
        EngineError it failed with."""
        parts = []
        for event in self:
            if event["type"] == "token":
                parts.append(event["text"])
            elif event["type"] == "error":
                raise EngineError(event["message"], event["status"])
            else:
                return {**event, "text": "".join(parts) + event.get("text", "")}


def _holdback(buf: bytes, stops: tuple) -> int:
    """How many trailing bytes of ``buf`` could begin a stop string (not to be shown yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:n]):
                best = n
                break
    return best


class _Row:
    """A running call: its working state (until stacked into a group), its sampler and the
    bytes it produced."""

    def __init__(self, call: Call, session, state, original):
        self.call = call
        self.session = session              # SessionRecord or None (stateless)
        self.state = state
        # The committed state, given back on failure; None when its file is the copy to go
        # back to (a persisting engine does not hold a second state per running call).
        self.original = original
        self.generated = bytearray()
        self.shown = 0                      # bytes of `generated` already sent
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token = None                   # the sampled token not yet fed to the model
        self.consumed = 0                   # tokens fed to the model in this call
        self.started = time.perf_counter()
        p = call.params
        self.generator = None
        if not p.greedy:
            self.generator = torch.Generator().manual_seed(
                p.seed if p.seed is not None else secrets.randbits(63))


class _Group:
    """Running rows whose states step together; ``batch`` is their stacked state once built."""

    def __init__(self, rows):
        self.rows = list(rows)
        self.batch = None


class Engine:
    def __init__(self, adapter: ModelAdapter, config: EngineConfig | None = None,
                 fingerprint: str = ""):
        if not isinstance(adapter, ModelAdapter):
            raise TypeError(f"adapter: expected a serve.models.ModelAdapter, "
                            f"got {type(adapter).__name__}")
        self.adapter = adapter
        self.config = config or EngineConfig()
        self.fingerprint = fingerprint or adapter.name
        self.store = SessionStore(self.config.state_dir, self.config.codec)
        unbounded = self.config.max_sessions      # nothing on disk: memory must keep all
        self.cache = StateCache(adapter.device, self.config.device_sessions
                                if self.config.persist else unbounded,
                                self.config.host_sessions, adapter.to_device)
        self.sessions: dict[str, SessionRecord] = {r.id: r for r in self.store.records()}
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting = 0
        self._groups: list[_Group] = []
        # Several writers: a session has one call at a time, so its saves never race, and
        # fsync-bound saves of different sessions overlap.
        self._persist = ThreadPoolExecutor(PERSIST_WORKERS, thread_name_prefix="serve-persist")
        self._stop = threading.Event()
        self._thread = None
        self.state_nbytes = adapter.state_nbytes(adapter.new_state())
        self.stats = _Stats()
        self.observations: dict[str, dict] = {}     # session (or call) id → the latest view

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="serve-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._persist.shutdown(wait=True)
        self.store.close()

    # ------------------------------------------------------------------ sessions

    def create_session(self, keep_text: bool = False) -> SessionRecord:
        with self._lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise TooBusy(f"too many sessions: the server keeps at most "
                              f"{self.config.max_sessions} (delete some, or start it with a "
                              f"larger --max-sessions)")
            now = time.time()
            rec = SessionRecord(id=secrets.token_hex(16), created=now, last_active=now,
                                model=self.fingerprint, keep_text=bool(keep_text),
                                text=b"" if keep_text else None)
            self.store.create(rec)
            self.sessions[rec.id] = rec
        return rec

    def fork_session(self, source_id: str) -> SessionRecord:
        """A new session that starts with a copy of ``source_id``'s memory (its state, counts
        and pending token; its text when it keeps text)."""
        with self._lock:
            src = self.get_session(source_id)
            if source_id in self._busy:
                raise SessionBusy(f"session {source_id}: a call is running; fork it after")
            self._busy.add(source_id)
        try:
            state = self._session_state(src)
            self.cache.put(source_id, state)
            rec = self.create_session(src.keep_text)
            rec = dataclasses.replace(src, id=rec.id, created=rec.created,
                                      last_active=rec.created)
            copy = self.adapter.clone(state)
            if self.config.persist:
                self.store.save(rec, self.adapter.to_payload(copy))
            with self._lock:
                self.sessions[rec.id] = rec
            self.cache.put(rec.id, copy)
            return rec
        finally:
            with self._lock:
                self._busy.discard(source_id)

    def get_session(self, session_id: str) -> SessionRecord:
        rec = self.sessions.get(session_id)
        if rec is None:
            raise UnknownSession(f"session {session_id!r}: no such session (create one with "
                                 f"POST /v1/sessions)")
        return rec

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            self.get_session(session_id)
            if session_id in self._busy:
                raise SessionBusy(f"session {session_id}: a call is running; wait for it to "
                                  f"end, then delete")
            del self.sessions[session_id]
            self.cache.drop(session_id)
            self.observations.pop(session_id, None)
            self.store.delete(session_id)

    def is_busy(self, session_id: str) -> bool:
        """Whether a call is running on the session (its state is in the decode batch)."""
        return session_id in self._busy

    def where(self, session_id: str) -> str:
        """Where the session's state is now: "batch", "device", "host" or "disk"."""
        return "batch" if self.is_busy(session_id) else self.cache.where(session_id)

    def session_info(self, session_id: str) -> dict:
        rec = self.get_session(session_id)
        info = rec.to_dict()
        text = info.pop("text")
        if rec.keep_text:
            info["text"] = (text or b"").decode("utf-8", errors="replace")
        info.update(state_bytes=self.state_nbytes, busy=self.is_busy(session_id),
                    resident=self.where(session_id),
                    kv_cache_bytes_gpt2=kv_cache_bytes(rec.tokens_seen))
        return info

    # ------------------------------------------------------------------ calls

    def submit(self, session_id, prompt: bytes, params: SamplingParams, loop=None) -> Call:
        """Queue a call on ``session_id`` (None: stateless, an empty history thrown away
        after). Raises EngineError subclasses for what can be refused at once."""
        if not isinstance(prompt, (bytes, bytearray)):
            raise BadRequest(f"prompt: expected bytes, got {type(prompt).__name__}")
        params.check(self.config.max_new_tokens)
        if len(prompt) > self.config.max_prompt_tokens:
            raise BadRequest(f"prompt: {len(prompt)} bytes is more than the limit of "
                             f"{self.config.max_prompt_tokens} (--max-prompt-tokens)")
        with self._lock:
            rec = None
            if session_id is not None:
                rec = self.get_session(session_id)
                if rec.model != self.fingerprint:
                    raise SessionBusy(f"session {session_id}: made by another model "
                                      f"({rec.model}); this server runs {self.fingerprint}")
                if session_id in self._busy:
                    raise SessionBusy(f"session {session_id}: another call is running on it "
                                      f"(a session takes one call at a time)")
            if not prompt and not (rec and rec.pending):
                raise BadRequest("prompt: expected at least one byte of text")
            if self._waiting + self.stats.active >= self.config.max_active:
                raise TooBusy(f"too many concurrent calls (at most {self.config.max_active}, "
                              f"--max-active); retry shortly")
            if session_id is not None:
                self._busy.add(session_id)
            self._waiting += 1
        call = Call(session_id, bytes(prompt), params, loop)
        self._inbox.put(call)
        return call

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit_waiting(block=not self._groups)
                self._drop_cancelled()
                if self._groups:
                    self._step_all()
            except Exception:                                     # noqa: BLE001
                traceback.print_exc()          # a bug: fail what runs, keep serving
                for g in self._groups:
                    for row in g.rows:
                        self._fail(row, 500, "internal error while decoding")
                self._groups = []

    def _admit_waiting(self, block: bool) -> None:
        while True:
            try:
                call = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            if call is None:
                return
            block = False
            with self._lock:
                self._waiting -= 1
                self.stats.active += 1
            try:
                self._admit(call)
            except Exception as exc:                              # noqa: BLE001
                status = exc.status if isinstance(exc, EngineError) else 500
                msg = exc.message if isinstance(exc, EngineError) else \
                    f"{type(exc).__name__}: {exc}"
                if status == 500:
                    traceback.print_exc()
                self._finish_failed(call, status, msg)

    def _session_state(self, rec: SessionRecord):
        state = self.cache.take(rec.id)
        if state is not None:
            return state
        loaded = self.store.load(rec.id)
        if loaded is None:
            return self.adapter.new_state()
        file_rec, payload = loaded
        if file_rec.tokens_seen != rec.tokens_seen:
            raise EngineError(f"session {rec.id}: its file holds {file_rec.tokens_seen} tokens "
                              f"but the index {rec.tokens_seen}")
        return self.adapter.from_payload(payload)

    def _admit(self, call: Call) -> None:
        if call.cancelled.is_set():
            raise EngineError("cancelled before it started")
        rec = self.sessions.get(call.session_id) if call.session_id else None
        if call.session_id and rec is None:
            raise UnknownSession(f"session {call.session_id!r}: deleted")
        original = self._session_state(rec) if rec else self.adapter.new_state()
        row = _Row(call, rec, None, original)
        ids = (rec.pending if rec else []) + list(call.prompt)
        tokens = torch.tensor(ids, dtype=torch.long)
        try:
            logits, row.state = self.adapter.prefill(original, tokens, self.config.prefill_chunk)
        except BaseException:
            self._give_back(row)
            raise
        if self.config.persist:
            row.original = None
        elif rec is not None and self.adapter.device.type != "cpu":
            # A memory-only engine keeps the rollback copy in host memory: the device then
            # holds one state per running call (its row of the batch), not two.
            row.original = self.adapter.to_device(original, "cpu")
        row.consumed = len(ids)
        self.stats.prefill_tokens += len(ids)
        if call.params.max_tokens == 0:
            self._complete(row, "length")
            return
        if self._sample(row, logits.view(1, -1).float().cpu()[0]):
            return
        self._join(row)

    def _join(self, row: _Row) -> None:
        key = self.adapter.batch_key(row.state)
        for g in self._groups:
            if self._group_key(g) == key:
                if g.batch is not None:
                    g.batch = self.adapter.join(g.batch, [row.state])
                    row.state = None
                g.rows.append(row)
                return
        self._groups.append(_Group([row]))

    def _leave(self, g: _Group, rows: list) -> None:
        """Take ``rows`` out of ``g``, each with its own state again."""
        if g.batch is not None:
            at = [g.rows.index(r) for r in rows]
            g.batch, states = self.adapter.leave(g.batch, at)
            for r, st in zip(rows, states):
                r.state = st
        for r in rows:
            g.rows.remove(r)

    def _group_key(self, g: _Group):
        return self.adapter.batch_key(g.batch if g.batch is not None else g.rows[0].state)

    def _unstack(self, g: _Group) -> None:
        """Give every row of ``g`` its own state again (before the group's rows change)."""
        if g.batch is not None:
            for row, st in zip(g.rows, self.adapter.split(g.batch)):
                row.state = st
            g.batch = None

    def _drop_cancelled(self) -> None:
        for g in self._groups:
            gone = [r for r in g.rows if r.call.cancelled.is_set()]
            if gone:
                self._leave(g, gone)
                for r in gone:
                    self._fail(r, 499, "cancelled")
        self._groups = [g for g in self._groups if g.rows]

    def _step_all(self) -> None:
        t0 = time.perf_counter()
        stepped, finished = 0, []
        for g in list(self._groups):
            try:
                if g.batch is None:
                    states = [r.state for r in g.rows]
                    for r in g.rows:
                        r.state = None            # the adapter may free each as it stacks
                    g.batch = self.adapter.stack(states)
                tokens = torch.tensor([r.token for r in g.rows], dtype=torch.long)
                logits, g.batch, obs = self.adapter.step(g.batch, tokens,
                                                         observe=self.config.observe)
                logits = logits.float().cpu()
            except Exception as exc:                              # noqa: BLE001
                traceback.print_exc()
                self._groups.remove(g)
                for r in g.rows:
                    self._fail(r, 500, f"decoding failed: {type(exc).__name__}: {exc}")
                continue
            stepped += len(g.rows)
            done = []
            for i, r in enumerate(g.rows):
                r.consumed += 1
                if obs is not None:
                    self._observe(r, obs[i])
                if self._sample(r, logits[i], defer_complete=True):
                    done.append(r)
            if done:
                self._leave(g, done)
                finished.extend(done)
                if not g.rows:
                    self._groups.remove(g)
        self._merge_groups()
        self.stats.step(stepped, time.perf_counter() - t0)
        for r in finished:                # after the stats: a caller woken by "done" sees them
            self._complete(r, r.finish_reason)

    def _merge_groups(self) -> None:
        """Groups that reached the same batch key step as one from now on."""
        if len(self._groups) < 2:
            return
        by_key: dict = {}
        for g in self._groups:
            by_key.setdefault(self._group_key(g), []).append(g)
        merged = []
        for gs in by_key.values():
            if len(gs) > 1:
                for g in gs:
                    self._unstack(g)
                gs = [_Group([r for g in gs for r in g.rows])]
            merged.extend(gs)
        self._groups = merged

    def _sample(self, row: _Row, logits: torch.Tensor, defer_complete: bool = False) -> bool:
        """Draw the next token from ``logits`` [V], show what can be shown; True when the call
        has ended (``row.finish_reason`` set, and completed unless deferred)."""
        p = row.call.params
        if p.greedy:
            tok = int(logits.argmax())
        else:
            tok = int(sample_next(logits.view(1, -1), float(p.temperature), p.top_k,
                                  row.generator))
        row.token = tok
        row.generated.append(tok)
        self.stats.tokens += 1
        reason = None
        cut = len(row.generated)
        for s in p.stop:
            at = row.generated.find(s, max(0, len(row.generated) - len(s)))
            if at >= 0:
                reason, cut = "stop", at
        if reason is None and len(row.generated) >= p.max_tokens:
            reason = "length"
        upto = cut if reason else len(row.generated) - _holdback(bytes(row.generated), p.stop)
        if upto > row.shown:
            text = row.decoder.decode(bytes(row.generated[row.shown:upto]))
            row.shown = upto
            if text:
                row.call.emit({"type": "token", "text": text})
        if reason is None:
            return False
        row.finish_reason = reason
        if not defer_complete:
            self._complete(row, reason)
        return True

    def _observe(self, row: _Row, obs) -> None:
        key = row.session.id if row.session else row.call.id
        now = time.perf_counter()
        rate = len(row.generated) / max(1e-6, now - row.started)
        self.observations[key] = {"time": time.time(), "tokens_per_s": round(rate, 2),
                                  "call_tokens": len(row.generated), **obs}
        if len(self.observations) > 4 * self.config.max_active + len(self.sessions):
            oldest = min(self.observations, key=lambda k: self.observations[k]["time"])
            self.observations.pop(oldest)

    # ------------------------------------------------------------------ endings

    def _usage(self, row: _Row) -> dict:
        return {"prompt_tokens": len(row.call.prompt), "completion_tokens": len(row.generated),
                "total_tokens": len(row.call.prompt) + len(row.generated)}

    def _complete(self, row: _Row, reason: str) -> None:
        """The call ended normally: commit (write the state, then the record) off the worker
        thread, then send "done"."""
        tail = row.decoder.decode(b"", final=True)
        event = {"type": "done", "finish_reason": reason, "usage": self._usage(row),
                 "text": tail, "seconds": time.perf_counter() - row.started}
        rec = row.session
        if rec is None:
            self._release(row)
            row.call.emit(event)
            return
        new = dataclasses.replace(
            rec, last_active=time.time(), calls=rec.calls + 1,
            tokens_seen=rec.tokens_seen + len(row.call.prompt) + len(row.generated),
            prompt_tokens=rec.prompt_tokens + len(row.call.prompt),
            completion_tokens=rec.completion_tokens + len(row.generated),
            pending=[] if row.token is None else [row.token],
            text=None if not rec.keep_text else
            (rec.text or b"") + row.call.prompt + bytes(row.generated))
        state = row.state
        self._persist.submit(self._commit, row, new, state, event)

    def _commit(self, row: _Row, new: SessionRecord, state, event: dict) -> None:
        try:
            if self.config.persist:
                self.store.save(new, self.adapter.to_payload(state))
        except Exception as exc:                                  # noqa: BLE001
            traceback.print_exc()
            self._give_back(row)
            self._release(row)
            row.call.emit({"type": "error", "status": 500,
                           "message": f"could not save the session's state ({exc}); the "
                                      f"session is as it was before this call"})
            return
        with self._lock:
            if new.id in self.sessions:
                self.sessions[new.id] = new
                self.cache.put(new.id, state)
        event["session"] = {"tokens_seen": new.tokens_seen, "stored_bytes": new.stored_bytes}
        self._release(row)
        row.call.emit(event)

    def _give_back(self, row: _Row) -> None:
        if row.session is None:
            return
        if row.original is not None:
            self.cache.put(row.session.id,
                           self.adapter.to_device(row.original, self.adapter.device))
        else:                           # the next call reads the state from its file
            self.cache.drop(row.session.id)

    def _release(self, row: _Row) -> None:
        with self._lock:
            self.stats.active -= 1
            if row.session is not None:
                self._busy.discard(row.session.id)

    def _fail(self, row: _Row, status: int, message: str, give_back: bool = True) -> None:
        if give_back:
            self._give_back(row)
        self._release(row)
        row.call.emit({"type": "error", "status": status, "message": message})

    def _finish_failed(self, call: Call, status: int, message: str) -> None:
        """A call that failed while being admitted (whatever state it took is given back)."""
        self._fail(_Row(call, self.sessions.get(call.session_id or ""), None, None),
                   status, message, give_back=False)

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict:
        with self._lock:
            busy = set(self._busy)
            n_sessions = len(self.sessions)
        return {"model": self.adapter.describe(), "fingerprint": self.fingerprint,
                "sessions": n_sessions, "busy_sessions": len(busy),
                "state_bytes_per_session": self.state_nbytes,
                "resident": self.cache.counts(), "codec": self.config.codec,
                **self.stats.snapshot()}


def step_ms_quantiles(seconds) -> tuple:
    """(p50, p99) in milliseconds of step durations in seconds; (None, None) for none."""
    ms = sorted(1e3 * t for t in seconds)
    if not ms:
        return None, None
    return round(ms[len(ms) // 2], 3), round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3)


class _Stats:
    """Counters of the decode loop: tokens, steps, a 5-second window of tokens/s."""

    WINDOW_S = 5.0

    def __init__(self):
        self.tokens = 0
        self.prefill_tokens = 0
        self.steps = 0
        self.active = 0
        self.last_batch = 0
        self.last_step_ms = 0.0
        self.step_seconds = collections.deque(maxlen=4096)   # one token per running call each
        self._window = collections.deque()

    def step(self, rows: int, seconds: float) -> None:
        self.steps += 1
        self.last_batch = rows
        self.last_step_ms = 1e3 * seconds
        self.step_seconds.append(seconds)
        now = time.time()
        self._window.append((now, rows))
        while self._window and self._window[0][0] < now - self.WINDOW_S:
            self._window.popleft()

    def snapshot(self) -> dict:
        now = time.time()
        recent = [(t, n) for t, n in self._window if t >= now - self.WINDOW_S]
        span = max(1e-3, now - recent[0][0]) if recent else self.WINDOW_S
        p50, p99 = step_ms_quantiles(list(self.step_seconds)[-512:])
        return {"step_ms_p50": p50, "step_ms_p99": p99, "tokens_generated": self.tokens,
                "prefill_tokens": self.prefill_tokens, "steps": self.steps,
                "active_calls": self.active, "batch_size": self.last_batch,
                "step_ms": round(self.last_step_ms, 3),
                "tokens_per_s": round(sum(n for _, n in recent) / span, 2) if recent else 0.0}

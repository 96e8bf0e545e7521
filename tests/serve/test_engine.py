"""serve.engine without a socket: sessions continue across calls and engine restarts exactly
as one sequential stream; failed and cancelled calls change nothing; limits are enforced."""
import threading

import pytest
import torch

from serve.engine import BadRequest, Engine, EngineConfig, SamplingParams, SessionBusy, \
    TooBusy, UnknownSession
from serve.models import ModelAdapter
from serving import assert_states_equal, greedy, make_engine, reference, stored_state, \
    tiny_adapter

CALLS = [(b"The lamp was lit", 13), (" at the \xe9nd".encode(), 9), (b"!", 1), (b"Q:", 0)]


@pytest.mark.parametrize("kind", ["bdh", "bsbr"])
def test_calls_continue_and_survive_a_restart(tmp_path, kind):
    ref_texts, ref_state = reference(tiny_adapter(kind), CALLS)
    eng = make_engine(tmp_path, kind)
    sid = eng.create_session().id
    first = [eng.submit(sid, p, greedy(n)).result() for p, n in CALLS[:2]]
    eng.shutdown()
    eng = make_engine(tmp_path, kind)                  # a new process would do the same
    rest = [eng.submit(sid, p, greedy(n)).result() for p, n in CALLS[2:]]
    texts = [r["text"] for r in first + rest]
    assert texts == [t.decode("utf-8", "replace") for t in ref_texts]
    assert_states_equal(eng.adapter, stored_state(eng, sid), ref_state)
    info = eng.session_info(sid)
    assert info["tokens_seen"] == sum(len(p) + n for p, n in CALLS) and info["calls"] == 4
    eng.shutdown()


def test_failed_call_leaves_the_session_as_it_was(engine, monkeypatch):
    sid = engine.create_session().id
    engine.submit(sid, *CALLS[0][:1], greedy(CALLS[0][1])).result()
    before = engine.store.path(sid).read_bytes()

    def broken(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.adapter, "step", broken)
    with pytest.raises(Exception, match="device lost"):
        engine.submit(sid, CALLS[1][0], greedy(5)).result()
    monkeypatch.undo()
    assert engine.store.path(sid).read_bytes() == before
    assert engine.session_info(sid)["calls"] == 1
    got = [engine.submit(sid, p, greedy(n)).result()["text"] for p, n in CALLS[1:3]]
    ref_texts, ref_state = reference(tiny_adapter(), CALLS[:3])
    assert got == [t.decode("utf-8", "replace") for t in ref_texts[1:]]
    assert_states_equal(engine.adapter, stored_state(engine, sid), ref_state)


def test_cancelled_call_leaves_the_session_as_it_was(engine):
    sid = engine.create_session().id
    call = engine.submit(sid, b"long", greedy(4000))
    events = iter(call)
    for _ in range(3):
        assert next(events)["type"] == "token"
    call.cancel()
    last = list(events)[-1]
    assert last["type"] == "error" and last["status"] == 499
    assert engine.session_info(sid)["tokens_seen"] == 0
    assert not engine.store.path(sid).exists()
    text = engine.submit(sid, CALLS[0][0], greedy(CALLS[0][1])).result()["text"]
    assert text == reference(tiny_adapter(), CALLS[:1])[0][0].decode("utf-8", "replace")


def test_eviction_to_host_and_disk_is_transparent(tmp_path):
    eng = make_engine(tmp_path, device_sessions=1, host_sessions=1)
    sids = [eng.create_session().id for _ in range(4)]
    prompts = [[(f"s{i} r{r} ".encode(), 4 + i) for r in range(3)] for i in range(4)]
    got = {s: [] for s in sids}
    for r in range(3):
        for s, calls in zip(sids, prompts):
            got[s].append(eng.submit(s, calls[r][0], greedy(calls[r][1])).result()["text"])
    moves = eng.cache.counts()
    assert moves["to_host"] > 0 and moves["dropped"] > 0 and moves["from_host"] >= 0
    for s, calls in zip(sids, prompts):
        ref_texts, ref_state = reference(tiny_adapter(), calls)
        assert got[s] == [t.decode("utf-8", "replace") for t in ref_texts]
        assert_states_equal(eng.adapter, stored_state(eng, s), ref_state)
    eng.shutdown()


def test_concurrent_sessions_at_one_position_decode_as_one_batch(engine):
    sids = [engine.create_session().id for _ in range(3)]
    prompts = [b"abcdef", b"uvwxyz", b"012345"]           # equal lengths: equal positions
    batches = []
    real_step = engine.adapter.step

    def spy(batch, tokens, observe=False):
        batches.append(tokens.numel())
        return real_step(batch, tokens, observe)

    engine.adapter.step = spy
    gate = threading.Event()
    real_prefill = engine.adapter.prefill

    def held(*a, **k):                    # admission waits until all three are queued
        gate.wait(10)
        return real_prefill(*a, **k)

    engine.adapter.prefill = held
    calls = [engine.submit(s, p, greedy(12)) for s, p in zip(sids, prompts)]
    gate.set()
    texts = [c.result()["text"] for c in calls]
    assert max(batches) == 3
    for s, p, t in zip(sids, prompts, texts):
        ref_texts, ref_state = reference(tiny_adapter(), [(p, 12)])
        assert t == ref_texts[0].decode("utf-8", "replace")
        st = stored_state(engine, s)
        for x, y in zip(engine.adapter.to_payload(st)["tensors"],
                        engine.adapter.to_payload(ref_state)["tensors"]):
            assert torch.equal(x, y)


def test_stop_strings_end_the_text_before_them(engine):
    ref = reference(tiny_adapter(), [(b"stop here", 40)])[0][0]
    stop = ref[12:14]
    sid = engine.create_session().id
    out = engine.submit(sid, b"stop here", greedy(40, stop=(stop,))).result()
    cut = ref.find(stop)
    assert out["finish_reason"] == "stop"
    assert out["text"] == ref[:cut].decode("utf-8", "replace")
    assert engine.session_info(sid)["completion_tokens"] == cut + len(stop)


def test_limits_and_bad_input(tmp_path):
    eng = make_engine(tmp_path, max_sessions=2, max_active=1, max_prompt_tokens=8,
                      max_new_tokens=50)
    a, b = eng.create_session().id, eng.create_session().id
    with pytest.raises(TooBusy, match="too many sessions"):
        eng.create_session()
    for params, match in [(greedy(51), "max_tokens"), (SamplingParams(temperature=-1), "temp"),
                          (SamplingParams(top_k=0), "top_k"),
                          (SamplingParams(stop=(b"",)), "stop")]:
        with pytest.raises(BadRequest, match=match):
            eng.submit(a, b"x", params)
    with pytest.raises(BadRequest, match="at least one byte"):
        eng.submit(a, b"", greedy(3))
    with pytest.raises(BadRequest, match="limit of 8"):
        eng.submit(a, b"123456789", greedy(3))
    with pytest.raises(UnknownSession):
        eng.submit("f" * 32, b"x", greedy(3))
    running = eng.submit(a, b"x", greedy(50))
    with pytest.raises(SessionBusy):
        eng.submit(a, b"y", greedy(3))
    with pytest.raises(TooBusy, match="concurrent"):
        eng.submit(b, b"y", greedy(3))
    with pytest.raises(SessionBusy):
        eng.delete_session(a)
    running.result()
    eng.delete_session(a)
    with pytest.raises(UnknownSession):
        eng.session_info(a)
    assert not eng.store.path(a).exists()
    eng.shutdown()


class ScriptAdapter(ModelAdapter):
    """A stand-in model that always predicts the next byte of a fixed script."""
    kind = "script"

    def __init__(self, script: bytes):
        super().__init__(torch.nn.Linear(1, 1), "script")
        self.script = script

    def new_state(self):
        return torch.zeros(1, dtype=torch.long)

    def position(self, state):
        return int(state[0])

    def state_nbytes(self, state):
        return 8

    def _logits(self, pos):
        return torch.nn.functional.one_hot(torch.tensor(self.script[pos % len(self.script)]),
                                           256).float()

    def prefill(self, state, tokens, chunk=0):
        state = state + tokens.numel()
        return self._logits(int(state[0]) - 1), state

    def stack(self, states):
        return torch.cat(states)

    def split(self, batch):
        return list(batch.split(1))

    def step(self, batch, tokens, observe=False):
        batch = batch + 1
        return torch.stack([self._logits(int(p) - 1) for p in batch]), batch, None


def test_streamed_text_never_splits_a_character(tmp_path):
    script = "héllo→✓ 日本 ".encode() + b"\xff"
    eng = Engine(ScriptAdapter(script), EngineConfig(state_dir=str(tmp_path))).start()
    call = eng.submit(None, b"a", greedy(len(script)))
    events = list(call)
    pieces = [e["text"] for e in events if e["type"] == "token"]
    assert "".join(pieces) + events[-1]["text"] == script.decode("utf-8", "replace")
    assert all("\ufffd" not in p for p in pieces[:-1])
    assert len(pieces) >= 8
    eng.shutdown()


def test_a_forked_session_continues_from_a_copy_of_the_memory(engine):
    src = engine.create_session().id
    engine.submit(src, CALLS[0][0], greedy(CALLS[0][1])).result()
    fork = engine.fork_session(src).id
    assert fork != src and engine.session_info(fork)["tokens_seen"] == \
        engine.session_info(src)["tokens_seen"]
    a = engine.submit(src, CALLS[1][0], greedy(CALLS[1][1])).result()["text"]
    b = engine.submit(fork, CALLS[1][0], greedy(CALLS[1][1])).result()["text"]
    assert a == b == reference(tiny_adapter(), CALLS[:2])[0][1].decode("utf-8", "replace")
    assert_states_equal(engine.adapter, stored_state(engine, src), stored_state(engine, fork))

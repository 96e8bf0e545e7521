"""serve.api against the app in process (FastAPI's TestClient): sessions, Server-Sent Events, the
WebSocket, the OpenAI routes, auth, and a clear 4xx for every kind of bad input."""
import json
import threading

import pytest
from fastapi.testclient import TestClient

from serve.api import create_app
from serving import greedy, make_engine, reference, tiny_adapter

KEY = "test-key-123"


@pytest.fixture
def served(tmp_path):
    eng = make_engine(tmp_path, max_sessions=3, max_active=2, max_prompt_tokens=64,
                      max_new_tokens=100)
    app = create_app(eng, api_key=KEY, max_request_bytes=4096)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield eng, client
    eng.shutdown()


def events(response):
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def ref_text(calls):
    return [t.decode("utf-8", "replace") for t in reference(tiny_adapter(), calls)[0]]


def test_session_lifecycle_and_streaming(served):
    eng, c = served
    r = c.post("/v1/sessions", json={"keep_text": True})
    assert r.status_code == 201
    sid = r.json()["id"]
    assert len(sid) == 32 and int(sid, 16) >= 0
    with c.stream("POST", f"/v1/sessions/{sid}/generate",
                  json={"prompt": "The lamp", "max_tokens": 9, "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        evs = events(r)
    assert evs[-1] == "[DONE]" and evs[-2]["type"] == "done"
    streamed = "".join(e["text"] for e in evs[:-1])
    second = c.post(f"/v1/sessions/{sid}/generate", json={
        "prompt": " was", "max_tokens": 5, "temperature": 0, "stream": False}).json()
    assert [streamed, second["text"]] == ref_text([(b"The lamp", 9), (b" was", 5)])
    info = c.get(f"/v1/sessions/{sid}").json()
    assert info["tokens_seen"] == 8 + 9 + 4 + 5 and info["calls"] == 2
    assert info["state_bytes"] == eng.state_nbytes and info["stored_bytes"] > 0
    assert info["text"] == "The lamp" + streamed + " was" + second["text"]
    assert info["last_active"] >= info["created"]
    assert [s["id"] for s in c.get("/v1/sessions").json()["data"]] == [sid]
    assert c.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    assert c.get(f"/v1/sessions/{sid}").status_code == 404


def test_websocket_streams_both_ways(served):
    eng, c = served
    sid = c.post("/v1/sessions").json()["id"]
    with c.websocket_connect(f"/v1/sessions/{sid}/ws",
                             headers={"Authorization": f"Bearer {KEY}"}) as ws:
        texts = []
        for prompt, n in [("abc", 6), ("def", 4)]:
            ws.send_json({"prompt": prompt, "max_tokens": n, "temperature": 0})
            parts = []
            while True:
                ev = ws.receive_json()
                parts.append(ev["text"])
                if ev["type"] != "token":
                    break
            assert ev["type"] == "done"
            texts.append("".join(parts))
        ws.send_json({"prompt": "x", "max_tokens": -1})
        assert ws.receive_json()["type"] == "error"
    assert texts == ref_text([(b"abc", 6), (b"def", 4)])


def test_openai_completions_and_chat(served):
    eng, c = served
    body = {"model": "any", "prompt": "Once", "max_tokens": 7, "temperature": 0}
    r = c.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["usage"]["completion_tokens"] == 7
    assert r["choices"][0]["text"] == ref_text([(b"Once", 7)])[0]
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        evs = events(s)
    assert evs[-1] == "[DONE]" and evs[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == r["choices"][0]["text"]
    sid = c.post("/v1/sessions").json()["id"]
    msgs = [{"role": "user", "content": "hi"}]
    chat = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5,
                                                "temperature": 0},
                  headers={"X-Session-Id": sid}).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == ref_text([(b"user: hi\nassistant: ",
                                                                  5)])[0]
    assert c.get(f"/v1/sessions/{sid}").json()["calls"] == 1
    with c.stream("POST", "/v1/chat/completions", json={
            "messages": msgs, "max_tokens": 4, "stream": True, "session": sid}) as s:
        evs = events(s)
    assert evs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert evs[-2]["choices"][0]["finish_reason"] == "length"
    assert c.get("/v1/models").json()["data"][0]["id"] == eng.adapter.name


def test_metrics_show_the_brain(served):
    eng, c = served
    sid = c.post("/v1/sessions").json()["id"]
    c.post(f"/v1/sessions/{sid}/generate", json={"prompt": "ab", "max_tokens": 3,
                                                 "stream": False})
    m = c.get("/v1/metrics", params={"session": sid}).json()
    brain = m["brain"]
    assert brain["session"] == sid and brain["kind"] == "neurons"
    assert brain["layers"] == 2 and len(brain["density"]) == 2
    assert m["sessions"][0]["kv_cache_bytes"] == 36864 * (2 + 3)
    assert m["server"]["tokens_generated"] >= 3


@pytest.mark.parametrize("method,path,kw,status,match", [
    ("get", "/v1/sessions/" + "0" * 32, {}, 404, "no such session"),
    ("get", "/v1/sessions/..%2F..%2Fetc", {}, 404, ""),
    ("post", "/v1/completions", {"json": {"prompt": ""}}, 400, "at least one byte"),
    ("post", "/v1/completions", {"json": {"prompt": "x" * 65}}, 400, "limit of 64"),
    ("post", "/v1/completions", {"json": {"prompt": "x", "temperature": -1}}, 400,
     "temperature"),
    ("post", "/v1/completions", {"json": {"prompt": "x", "top_p": 0.5}}, 400, "top_p"),
    ("post", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 101}}, 400,
     "max_tokens"),
    ("post", "/v1/completions", {"json": {"prompt": "x", "n": 2}}, 400, "n > 1"),
    ("post", "/v1/completions", {"content": b'{"prompt": "\xff\xfe"}'}, 400, "UTF-8"),
    ("post", "/v1/completions", {"content": b'{"prompt": "\\ud800"}'}, 400, "UTF-8"),
    ("post", "/v1/completions", {"content": b"{" + b" " * 5000 + b"}"}, 413, "too large"),
    ("post", "/v1/completions", {"json": {"prompt": "x", "session": "nope"}}, 404, "session"),
    ("post", "/v1/chat/completions", {"json": {"messages": []}}, 400, "messages"),
])
def test_bad_input_gets_a_clear_4xx(served, method, path, kw, status, match):
    _, c = served
    if "content" in kw:
        kw = {**kw, "headers": {"Content-Type": "application/json"}}
    r = getattr(c, method)(path, **kw)
    assert r.status_code == status, r.text
    if match:
        assert match in r.json()["error"]["message"]


def test_auth_and_limits(served):
    eng, c = served
    assert c.get("/health", headers={"Authorization": ""}).status_code == 200
    for h in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        assert c.get("/v1/models", headers=h).status_code == 401
        assert c.post("/v1/sessions", headers=h).status_code == 401
    a, b = c.post("/v1/sessions").json()["id"], c.post("/v1/sessions").json()["id"]
    c.post("/v1/sessions")
    r = c.post("/v1/sessions")
    assert r.status_code == 429 and "too many sessions" in r.json()["error"]["message"]
    gate, real_prefill = threading.Event(), eng.adapter.prefill
    eng.adapter.prefill = lambda *a, **k: gate.wait(10) and real_prefill(*a, **k)
    running = [eng.submit(a, b"x", greedy(3)), eng.submit(None, b"y", greedy(3))]
    r = c.post("/v1/completions", json={"prompt": "z", "session": b})
    assert r.status_code == 429 and "concurrent" in r.json()["error"]["message"]
    r = c.post(f"/v1/sessions/{a}/generate", json={"prompt": "z"})
    assert r.status_code == 409
    gate.set()
    for call in running:
        call.result()

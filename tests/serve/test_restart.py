"""A real server process, killed with SIGKILL in the middle of a generation and restarted:
every session continues from its last completed call, bit-exactly against a run that was never
killed (greedy decoding; the reference is the same model processing the same calls in turn)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.builder import build_adapter
from serve.store import SessionStore
from serving import assert_states_equal, free_port, reference

ROOT = Path(__file__).resolve().parents[2]


def start_server(state_dir, port):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GLASSBRAIN_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--state-dir", str(state_dir),
                             "--port", str(port), "--train-steps", "0",
                             "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 90 s")


def call(url, sid, prompt, n):
    r = httpx.post(f"{url}/v1/sessions/{sid}/generate", timeout=60, json={
        "prompt": prompt.decode(), "max_tokens": n, "temperature": 0, "stream": False})
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_kill_9_mid_generation_then_restart_continues_bit_exact(tmp_path):
    state_dir = tmp_path / "state"
    plan = {0: [(b"The lamp", 17), (b" was lit", 5), (b" and", 9), (b"?", 3)],
            1: [(b"Bread remembers", 8), (b" its", 12), (b" dough", 4), (b"!", 6)],
            2: [(b"Q: what", 11), (b" A:", 7), (b" the", 2), (b" end", 5)]}
    proc, url = start_server(state_dir, free_port())
    got = {}
    try:
        sids = [httpx.post(url + "/v1/sessions", timeout=10).json()["id"] for _ in plan]
        for i, sid in enumerate(sids):
            got[i] = [call(url, sid, p, n) for p, n in plan[i][:2]]
        # a long generation on session 0, killed after a few tokens have streamed
        with httpx.stream("POST", f"{url}/v1/sessions/{sids[0]}/generate", timeout=60,
                          json={"prompt": " interrupted", "max_tokens": 4000}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 5:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    proc, url = start_server(state_dir, free_port())
    try:
        listed = {s["id"]: s for s in httpx.get(url + "/v1/sessions").json()["data"]}
        assert set(listed) == set(sids)
        for i, sid in enumerate(sids):
            assert listed[sid]["calls"] == 2
            got[i] += [call(url, sid, p, n) for p, n in plan[i][2:]]
        metrics = httpx.get(url + "/v1/metrics").json()
        assert metrics["server"]["sessions"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    adapter = build_adapter("bdh", cache_dir=state_dir, train_steps=0, log=lambda *a: None)
    store = SessionStore(state_dir)
    for i, sid in enumerate(sids):
        texts, state = reference(adapter, plan[i])
        assert got[i] == [t.decode("utf-8", "replace") for t in texts], json.dumps(got[i])
        rec, payload = store.load(sid)
        assert rec.calls == 4 and rec.tokens_seen == sum(len(p) + n for p, n in plan[i])
        assert_states_equal(adapter, adapter.from_payload(payload), state)
    store.close()

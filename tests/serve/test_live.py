"""A real uvicorn server in this process: the `openai` client works against it unchanged, and a
bounded concurrent load (64 sessions × 20 calls) loses no session and no state."""
import asyncio
import random

import httpx
import pytest
import torch

from serve.api import create_app
from serving import ThreadServer, make_engine, reference, stored_state, tiny_adapter


def test_openai_client_against_a_live_server(tmp_path):
    openai = pytest.importorskip("openai", reason="the openai package is not installed "
                                                  "(pip install openai)")
    eng = make_engine(tmp_path)
    with ThreadServer(create_app(eng, api_key="k")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k")
        assert [m.id for m in client.models.list()] == [eng.adapter.name]
        done = client.completions.create(model=eng.adapter.name, prompt="Once", max_tokens=6,
                                         temperature=0)
        want = reference(tiny_adapter(), [(b"Once", 6)])[0][0].decode("utf-8", "replace")
        assert done.choices[0].text == want and done.usage.completion_tokens == 6
        sid = httpx.post(url + "/v1/sessions", headers={"Authorization": "Bearer k"}).json()["id"]
        chunks = client.chat.completions.create(
            model=eng.adapter.name, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            temperature=0, stream=True, extra_body={"session": sid})
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == reference(tiny_adapter(), [(b"user: hi\nassistant: ", 5)])[0][0].decode(
            "utf-8", "replace")
        assert eng.session_info(sid)["calls"] == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="m", prompt="x", temperature=-1)
    eng.shutdown()


SESSIONS, CALLS = 64, 20


def test_concurrent_load_loses_nothing(tmp_path):
    eng = make_engine(tmp_path, max_active=SESSIONS, device_sessions=16, host_sessions=16,
                      observe=False)
    rng = random.Random(0)
    plans = [[(bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 6))),
               rng.randrange(1, 4)) for _ in range(CALLS)] for _ in range(SESSIONS)]

    async def session(client, plan):
        sid = (await client.post("/v1/sessions")).json()["id"]
        texts = []
        for prompt, n in plan:
            r = await client.post(f"/v1/sessions/{sid}/generate", json={
                "prompt": prompt.decode(), "max_tokens": n, "temperature": 0, "stream": False})
            assert r.status_code == 200, r.text
            texts.append(r.json()["text"])
        return sid, texts

    async def load(url):
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=SESSIONS)) as client:
            return await asyncio.wait_for(asyncio.gather(*(session(client, p) for p in plans)),
                                          timeout=120)

    with ThreadServer(create_app(eng)) as url:
        results = asyncio.run(load(url))
    assert len(eng.sessions) == SESSIONS
    adapter = tiny_adapter()
    for (sid, texts), plan in zip(results, plans):
        rec = eng.sessions[sid]
        assert rec.calls == CALLS and rec.tokens_seen == sum(len(p) + n for p, n in plan)
        ref_texts, ref_state = reference(adapter, plan)
        assert texts == [t.decode("utf-8", "replace") for t in ref_texts]
        got = adapter.to_payload(stored_state(eng, sid))
        want = adapter.to_payload(ref_state)
        assert got["position"] == want["position"]
        for x, y in zip(got["tensors"], want["tensors"]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    eng.shutdown()

"""Helpers of the server tests: tiny untrained models (built in milliseconds), engines on a
temporary state folder, the sequential reference a session must equal, a free loopback port."""
import socket

import torch

from bdh import BDH, BDHConfig
from bsbr import BankConfig, BSBRLM, BSBRLMConfig
from serve.engine import Engine, EngineConfig, SamplingParams
from serve.models import BDHAdapter, BSBRAdapter


def tiny_adapter(kind: str = "bdh", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "bdh":
        return BDHAdapter(BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2,
                                        mlp_internal_dim_multiplier=8, dropout=0.0)))
    return BSBRAdapter(BSBRLM(BSBRLMConfig(n_layer=2, d_model=32, n_head=2, chunk_size=8,
                                           top_k=2, bank=BankConfig((2, 2, 1)))))


def make_engine(path, kind: str = "bdh", **config) -> Engine:
    return Engine(tiny_adapter(kind), EngineConfig(state_dir=str(path), **config)).start()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def reference(adapter, calls):
    """What a session must produce: each (prompt bytes, n) call processed in turn, greedy, by
    the adapter alone (no engine, no batching, nothing stored). Returns (texts, final state)."""
    state, pending, texts = adapter.new_state(), [], []
    for prompt, n in calls:
        logits, state = adapter.prefill(state, torch.tensor(pending + list(prompt)))
        out = []
        for i in range(n):
            out.append(int(logits.argmax()))
            if i + 1 < n:
                lg, batch, _ = adapter.step(adapter.stack([state]), torch.tensor(out[-1:]))
                logits, state = lg[0], adapter.split(batch)[0]
        pending = out[-1:]
        texts.append(bytes(out))
    return texts, state


def stored_state(engine, session_id):
    """The session's state as its file holds it."""
    _, payload = engine.store.load(session_id)
    return engine.adapter.from_payload(payload)


def state_tensors(adapter, state) -> list:
    return [t for t in adapter.to_payload(state)["tensors"]]


def assert_states_equal(adapter, a, b) -> None:
    assert adapter.position(a) == adapter.position(b)
    for x, y in zip(state_tensors(adapter, a), state_tensors(adapter, b)):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """``with ThreadServer(app) as url:`` a real uvicorn server on a free loopback port, in a
    thread of this process."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", ws="websockets"))

    def __enter__(self) -> str:
        import threading
        import time
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)

"""python -m serve's command line: loopback by default, a warning when bound to a public
address without a key, the key from --api-key or the environment."""
import logging

import pytest
from fastapi.testclient import TestClient

import serve.builder
from serve.__main__ import API_KEY_ENV, is_loopback, main
from serving import tiny_adapter


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True),
                                       ("localhost", True), ("0.0.0.0", False),
                                       ("192.168.1.4", False), ("example.org", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


@pytest.fixture
def started(monkeypatch, tmp_path):
    """main() up to uvicorn.run, which records its app instead of serving."""
    import uvicorn
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(serve.builder, "build_adapter", lambda *a, **k: tiny_adapter())
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def run(*args):
        seen.clear()
        main(["--state-dir", str(tmp_path), *args])
        return seen
    return run


def test_public_address_without_a_key_warns(started, caplog):
    with caplog.at_level(logging.WARNING, logger="serve"):
        seen = started("--host", "0.0.0.0", "--port", "8123")
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8123
    assert "WITHOUT an API key" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve"):
        seen = started()
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert "WITHOUT" not in caplog.text


def test_the_key_may_come_from_the_environment(started, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    app = started("--host", "0.0.0.0")["app"]
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code \
            == 200
        assert c.get("/health").status_code == 200

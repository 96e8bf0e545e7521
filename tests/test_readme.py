"""Every ```python block of the README runs as written: verbatim, each in a fresh Python process
with nothing defined beforehand, in an empty folder (so a block that needs a name it does not
define, or a file it does not write, fails here as it would for a reader). A block that says it
needs a running `python -m serve` runs against a real server started as the README says."""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
NEEDS_SERVER = "needs a running `python -m serve`"
SERVER_PORT = 8000                                 # the README's address: 127.0.0.1:8000


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", open(README, encoding="utf-8").read(),
                      re.S | re.M)


def reader_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # The interpreter setting of the tests is not what a reader has: run with the reader's
    # environment (no TRITON_INTERPRET), so "auto" picks the PyTorch path on the CPU.
    env.pop("TRITON_INTERPRET", None)
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_healthy(proc, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"python -m serve exited with {proc.returncode}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{SERVER_PORT}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"python -m serve did not answer /health within {deadline_s} s")


@pytest.fixture
def readme_server(tmp_path):
    """`python -m serve` with its defaults (a state folder of its own), as the README starts it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    if not _port_free(SERVER_PORT):
        pytest.skip(f"port {SERVER_PORT} (the README's) is taken on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--state-dir", str(tmp_path / "s")],
                            cwd=tmp_path, env=reader_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(proc, 240)
        yield
    finally:
        proc.kill()
        proc.wait()


def test_the_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert any("hebbian_attention" in b for b in blocks)
    assert any("set_attn_implementation" in b for b in blocks)


def _run_block(block: str, cwd) -> None:
    done = subprocess.run([sys.executable, "-c", block], cwd=cwd, env=reader_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"README block failed:\n{block}\n--- stderr ---\n"
                                  f"{done.stderr[-3000:]}")


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_as_written(index, tmp_path, request):
    block = python_blocks()[index]
    if NEEDS_SERVER in block:
        pytest.importorskip("openai")
        request.getfixturevalue("readme_server")
    _run_block(block, tmp_path)

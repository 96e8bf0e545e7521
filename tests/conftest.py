"""Test configuration shared by every test file.

Triton kernels run under the interpreter when there is no CUDA device (CI). The variable must be
set before any kernel module is imported, so it is set here, once, at collection start. The
interpreter mishandles bf16 loads: interpreter tests use float32 or float16 only.
"""
import os
import random
import zlib

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU tests cheap on a 2-core machine and deterministic across runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed_everything(request):
    """Seed torch, numpy and random per test, from the test's id, so each test is reproducible
    on its own and independent of the order tests run in."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def kernel_device():
    """Where kernel tests run: the GPU if there is one, else the CPU under TRITON_INTERPRET."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floating tensors, so any output element
    a kernel forgets to write shows up as NaN instead of as leftover memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    yield

"""experiments.measure: the CUDA kernel profile."""
import pytest
import torch

from experiments.measure import cuda_kernel_profile


@pytest.mark.gpu
def test_cuda_kernel_profile_counts_calls_per_step():
    x = torch.randn(512, 512, device="cuda")
    calls = []

    def step(i):
        calls.append(i)
        (x @ x).relu_()
    rows = cuda_kernel_profile(step, steps=3, top=5)
    assert calls == [0, 1, 2, 3]                          # one warm-up, three traced
    assert 1 <= len(rows) <= 5 and all(r["us_total"] > 0 for r in rows)
    assert rows == sorted(rows, key=lambda r: -r["us_total"])
    assert any(r["calls"] == 1 for r in rows)            # per step, not per trace

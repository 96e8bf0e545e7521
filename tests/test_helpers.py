"""The shared assertions must be able to fail."""
import pytest
import torch

from helpers import assert_rel_close, rel_err


def test_rel_close_passes_and_fails():
    ref = torch.randn(50)
    assert_rel_close(ref + 1e-9 * torch.randn(50), ref, 1e-6)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(ref + 0.1 * torch.randn(50), ref, 1e-3)


def test_rel_close_rejects_nan_and_shape():
    ref = torch.randn(8)
    bad = ref.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_rel_close(bad, ref, 1.0)
    with pytest.raises(AssertionError, match="shape"):
        rel_err(torch.randn(7), ref)


def test_poison_empty_fills_nan(poison_empty):
    assert torch.isnan(torch.empty(4)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3))).all()
    assert torch.empty(2, dtype=torch.long).dtype == torch.long

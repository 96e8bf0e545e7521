"""The Triton RoPE pass (kernels.rope.triton_rotate) against the PyTorch rotation
(kernels.rope.rotate_reference).

Runs under TRITON_INTERPRET=1 on the CPU (set by conftest), on the GPU where there is one."""
import pytest
import torch

from kernels.rope import pair_freqs64
from kernels.rope import rotate_reference as _rotate
from kernels.rope.triton_rotate import rope_rotate_triton
from helpers import assert_rel_close


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("start", [0, 5, 1_000_003])
@pytest.mark.parametrize("inverse", [False, True])
def test_triton_rope_matches_reference(kernel_device, poison_empty, dtype, tol, start, inverse):
    B, nh, T, N = 2, 3, 37, 72                     # T, N/2 not multiples of the tiles
    x = torch.randn(B, nh, T, N, device=kernel_device).to(dtype)
    out = rope_rotate_triton(x, start, inverse, pair_freqs64(N, x.device))
    ref = _rotate(x.double(), start, inverse)
    assert out.dtype == dtype and out.shape == x.shape
    assert_rel_close(out, ref, tol, "rotated")


def test_triton_rope_inverse_undoes_rotation(kernel_device):
    x = torch.randn(1, 2, 19, 40, device=kernel_device)
    f = pair_freqs64(40, x.device)
    back = rope_rotate_triton(rope_rotate_triton(x, 123, False, f), 123, True, f)
    assert_rel_close(back, x, 1e-5, "inverse∘rotate")
    # and the rotation is not the identity
    assert (rope_rotate_triton(x, 123, False, f) - x).abs().max() > 0.1


def test_triton_rope_partial_row_group(kernel_device, poison_empty):
    # 21 batch·head rows: one full group of 16 and a partial group of 5.
    x = torch.randn(3, 7, 5, 8, device=kernel_device)
    out = rope_rotate_triton(x, 42, False, pair_freqs64(8, x.device))
    assert_rel_close(out, _rotate(x.double(), 42, False), 1e-5, "rotated")


@pytest.mark.parametrize("starts", [(5, 300), (0, 1_000_003, 7)])
@pytest.mark.parametrize("T", [1, 19])
def test_triton_rope_per_row_positions(kernel_device, poison_empty, starts, T):
    """One device-held position per row of the first dimension (streams at different
    positions): each row equals that row rotated alone, heads sharing their row's position;
    3 rows × 7 heads = 21 batch·head rows cross a row group of 16."""
    x = torch.randn(len(starts), 7, T, 40, device=kernel_device)
    pos = torch.tensor(starts, dtype=torch.int64, device=kernel_device)
    out = rope_rotate_triton(x, pos, False, pair_freqs64(40, x.device))
    for b, s in enumerate(starts):
        assert_rel_close(out[b], _rotate(x[b].double(), s, False), 1e-5, f"row {b}")
    back = rope_rotate_triton(out, pos, True, pair_freqs64(40, x.device))
    assert_rel_close(back, x, 1e-5, "inverse∘rotate, per row")


def test_triton_rope_rejects_a_position_per_row_of_the_wrong_length(kernel_device):
    x = torch.randn(2, 3, 1, 8, device=kernel_device)
    with pytest.raises(ValueError, match="start"):
        rope_rotate_triton(x, torch.tensor([1, 2, 3], device=kernel_device), False,
                           pair_freqs64(8, x.device))

"""kernels.varlen: the cu_seqlens checks every varlen op shares, and the moves between a packed
row and a right-padded batch (round trips, padding zeros, gradients)."""
import pytest
import torch

from kernels.varlen import (check_cu_seqlens, checked_offsets, pack, padded_index, seq_lengths,
                            unpack)

LENGTHS = (3, 0, 5, 1)                       # an empty sequence inside


def offsets_of(lengths, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_good_offsets_give_n(dtype):
    cu = offsets_of(LENGTHS, dtype)
    assert check_cu_seqlens(cu, 9, torch.device("cpu")) == 4
    assert checked_offsets(cu, 9, torch.device("cpu")) == [0, 3, 3, 8, 9]
    assert seq_lengths(cu).tolist() == list(LENGTHS)


@pytest.mark.parametrize("cu,total,err,match", [
    ([0, 3, 9], 9, TypeError, "cu_seqlens: expected an int32 or int64 tensor"),
    (torch.tensor([0.0, 9.0]), 9, ValueError, "cu_seqlens: expected a 1-D int32 or int64"),
    (torch.tensor([[0, 9]]), 9, ValueError, r"cu_seqlens: .*shape \[1, 2\]"),
    (torch.tensor([0]), 0, ValueError, "N >= 1"),
    (torch.tensor([1, 9]), 9, ValueError, "from 0 to the packed length 9, got 1"),
    (torch.tensor([0, 8]), 9, ValueError, "from 0 to the packed length 9, got 0 … 8"),
    (torch.tensor([0, 5, 4, 9]), 9, ValueError, "non-decreasing"),
    (torch.tensor([0, 9], device="meta"), 9, ValueError, "cu_seqlens: expected device cpu"),
])
def test_bad_offsets_are_refused_by_name(cu, total, err, match):
    with pytest.raises(err, match=match):
        check_cu_seqlens(cu, total, torch.device("cpu"))


@pytest.mark.parametrize("dim", [1, 2])
def test_unpack_then_pack_is_the_identity(dim):
    """Packed [1, H, T, D] (dim 2) or [1, T, H, D] (dim 1) -> right-padded [N, ..., max, ...]
    with zeros in the padding -> packed again, exactly."""
    cu = offsets_of(LENGTHS)
    x = torch.randn(1, 9, 2, 3) if dim == 1 else torch.randn(1, 2, 9, 3)
    padded = unpack(x, cu, dim=dim)
    assert padded.shape == ((4, 5, 2, 3) if dim == 1 else (4, 2, 5, 3))
    rows = padded.movedim(dim, 1)                          # [N, max, ...]
    seqs = x.squeeze(0).movedim(dim - 1, 0)                # [T, ...]
    for n, (lo, L) in enumerate(zip(cu[:-1].tolist(), LENGTHS)):
        assert torch.equal(rows[n, :L], seqs[lo:lo + L])
        assert not rows[n, L:].any()
    assert torch.equal(pack(padded, cu, dim=dim), x)


def test_pack_then_unpack_keeps_the_valid_slots():
    """A padded batch with junk in the padding: pack drops it, unpack puts zeros back."""
    cu = offsets_of(LENGTHS)
    padded = torch.randn(4, 2, 6, 3)                       # max_len 6 > the longest (5)
    _, valid = padded_index(cu, 6)
    back = unpack(pack(padded, cu), cu, max_len=6)
    assert torch.equal(back, padded * valid[:, None, :, None])


def test_unpack_and_pack_are_differentiable():
    cu = offsets_of(LENGTHS)
    x = torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: unpack(t, cu), (x,))
    y = torch.randn(4, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pack(t, cu), (y,))

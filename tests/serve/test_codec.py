"""serve.codec: lossless codecs round-trip bit-exactly; bf16 is close but lossy; damaged
encodings are refused."""
import pytest
import torch

from helpers import rel_err
from serve.codec import CodecError, LOSSLESS, decode_tensor, encode_tensor, encoded_nbytes


def state_like():
    """A [2, 3, 37, 13] float32 tensor with zero rows, a -0.0 row and a -0.0 element."""
    t = torch.randn(2, 3, 37, 13)
    t[0, 1, 5] = 0
    t[1, :, 20:30] = 0
    t[1, 2, 3] = -0.0
    t[0, 0, 0, 4] = -0.0
    return t


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codecs_are_bit_exact(codec):
    t = state_like()
    out = decode_tensor(encode_tensor(t, codec))
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.int32), t.view(torch.int32))


@pytest.mark.parametrize("codec", LOSSLESS)
def test_dense_tensors_round_trip(codec):
    t = torch.randn(5, 3, 11)
    assert torch.equal(decode_tensor(encode_tensor(t, codec)), t)


def test_zero_rows_are_not_stored():
    t = state_like()
    zeros = (t.reshape(-1, 13).view(torch.int32) == 0).all(1).sum().item()
    assert zeros == 31                                       # 1 + 30 rows; -0.0 rows count
    assert encoded_nbytes(encode_tensor(t, "rows")) < t.numel() * 4 - (zeros - 1) * 13 * 4


def test_bf16_is_close_but_lossy():
    t = state_like()
    out = decode_tensor(encode_tensor(t, "bf16"))
    err = rel_err(out, t)
    assert 0 < err < 1e-2


def test_zlib_shrinks_float_exponents():
    t = torch.randn(4096, 64) * 1e-3                          # exponents take few values
    assert encoded_nbytes(encode_tensor(t, "zlib")) < 0.9 * t.numel() * 4


@pytest.mark.parametrize("damage", ["mask", "low", "high", "codec", "shape", "bomb"])
def test_damaged_encodings_are_refused(damage):
    enc = encode_tensor(state_like(), "zlib")
    if damage == "mask":
        enc["mask"] = enc["mask"][:-1]
    elif damage == "low":
        enc["low"] = enc["low"][1:]
    elif damage == "high":
        enc["high"] = enc["high"][: len(enc["high"]) // 2]
    elif damage == "codec":
        enc["codec"] = "pickle"
    elif damage == "shape":
        enc["shape"] = [2, 3, 37, "13"]
    else:                                                     # inflates far past the header
        import zlib
        enc["high"] = torch.frombuffer(bytearray(zlib.compress(bytes(1 << 20))),
                                       dtype=torch.uint8)
    with pytest.raises(CodecError):
        decode_tensor(enc)

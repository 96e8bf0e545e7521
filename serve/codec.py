"""Compact, checked encodings of a session's state tensors for the disk.

    enc = encode_tensor(t, "zlib")      # a dict of small tensors and plain values
    t   = decode_tensor(enc)            # bit-exact for "raw", "rows" and "zlib"

Codecs (every one first drops the all-zero rows of t viewed as [rows, last dim], recorded in a
packed bit mask: a fresh BDH state is zero, and a neuron that never fired has a zero row):

* "raw":  the tensor as it is (no row mask). Lossless.
* "rows": the nonzero rows as they are. Lossless.
* "zlib": the nonzero rows split into byte planes; the most significant plane of each element
  (sign and high exponent bits, which take few values) is zlib-compressed, the low planes
  (mantissa bytes, close to random) are stored as they are. Lossless.
* "bf16": the nonzero rows rounded to bfloat16. LOSSY (about 3 significant digits): a resumed
  session then differs from one that was never stored.

A row counts as zero only when all its bits are zero, so -0.0 survives. Decoding treats the
dict as untrusted: every field is type- and size-checked, and the zlib stream may not inflate
past the size the header promises.
"""
from __future__ import annotations

import sys
import zlib

import numpy as np
import torch

CODECS = ("raw", "rows", "zlib", "bf16")
LOSSLESS = ("raw", "rows", "zlib")
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CodecError(ValueError):
    """An encoded tensor that does not decode (damaged, or not made by this module)."""


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 1 else t.reshape(1, 1)


def encode_tensor(t: torch.Tensor, codec: str = "zlib", level: int = 1) -> dict:
    """``t`` (a floating tensor on any device) encoded by ``codec`` (see the module docstring)."""
    if codec not in CODECS:
        raise ValueError(f"codec: expected one of {CODECS}, got {codec!r}")
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t: expected a floating tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    t = t.detach().cpu().contiguous()
    if codec == "raw":
        return {"codec": "raw", "data": t}
    if codec == "bf16" and t.dtype != torch.float32:
        raise TypeError(f"codec 'bf16': expected a float32 tensor, got {t.dtype}")
    rows = _rows(t)
    nonzero = (rows.view(_INT_VIEW[t.element_size()]) != 0).any(1)
    vals = rows if bool(nonzero.all()) else rows[nonzero]       # dense: no gather
    out = {"codec": codec, "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1],
           "mask": torch.from_numpy(np.packbits(nonzero.numpy()))}
    if codec == "rows":
        out["data"] = vals
    elif codec == "bf16":
        out["data"] = vals.to(torch.bfloat16)
    else:
        size = t.element_size()
        planes = vals.reshape(-1).view(torch.uint8).view(-1, size).numpy()
        top = size - 1 if sys.byteorder == "little" else 0
        low = slice(0, size - 1) if top else slice(1, size)
        out["byteorder"] = sys.byteorder
        out["low"] = torch.from_numpy(np.ascontiguousarray(planes[:, low]))
        packed = zlib.compress(np.ascontiguousarray(planes[:, top]), level)
        out["high"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    return out


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CodecError(f"encoded tensor: {what}")


def _is_tensor(x, dtype=None) -> bool:
    return isinstance(x, torch.Tensor) and x.layout == torch.strided and (
        dtype is None or x.dtype == dtype)


def decode_tensor(enc: dict) -> torch.Tensor:
    """The tensor that `encode_tensor` encoded (on the CPU). Raises CodecError for anything
    that does not fit together."""
    _expect(isinstance(enc, dict) and enc.get("codec") in CODECS,
            f"expected a dict with a codec among {CODECS}")
    codec = enc["codec"]
    if codec == "raw":
        _expect(_is_tensor(enc.get("data")) and enc["data"].is_floating_point(),
                "raw data is not a floating tensor")
        return enc["data"]
    shape, dtype_name = enc.get("shape"), enc.get("dtype")
    _expect(isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool)
                                            and n >= 0 for n in shape) and len(shape) <= 8,
            f"bad shape {shape!r}")
    dtype = getattr(torch, str(dtype_name), None) if isinstance(dtype_name, str) else None
    _expect(isinstance(dtype, torch.dtype) and dtype.is_floating_point,
            f"bad dtype {dtype_name!r}")
    last = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    mask = enc.get("mask")
    _expect(_is_tensor(mask, torch.uint8) and mask.numel() == (n_rows + 7) // 8,
            "row mask does not match the shape")
    nonzero = torch.from_numpy(np.unpackbits(mask.numpy())[:n_rows].astype(bool))
    kept = int(nonzero.sum())
    if codec in ("rows", "bf16"):
        want = dtype if codec == "rows" else torch.bfloat16
        data = enc.get("data")
        _expect(_is_tensor(data, want) and list(data.shape) == [kept, last],
                f"data: expected {want} [{kept}, {last}]")
        vals = data.to(dtype)
    else:
        size = torch.empty((), dtype=dtype).element_size()
        low, high = enc.get("low"), enc.get("high")
        _expect(enc.get("byteorder") == sys.byteorder,
                f"written on a {enc.get('byteorder')}-endian machine, this one is "
                f"{sys.byteorder}-endian")
        _expect(_is_tensor(low, torch.uint8) and list(low.shape) == [kept * last, size - 1],
                "low byte planes do not match the shape")
        _expect(_is_tensor(high, torch.uint8) and high.dim() == 1, "high plane missing")
        inflate = zlib.decompressobj()
        try:
            top_bytes = inflate.decompress(high.numpy().tobytes(), kept * last)
        except zlib.error as exc:
            raise CodecError(f"encoded tensor: high plane does not inflate ({exc})") from None
        _expect(len(top_bytes) == kept * last and not inflate.unconsumed_tail,
                "high plane inflates to the wrong size")
        planes = np.empty((kept * last, size), dtype=np.uint8)
        top = size - 1 if sys.byteorder == "little" else 0
        planes[:, slice(0, size - 1) if top else slice(1, size)] = low.numpy()
        planes[:, top] = np.frombuffer(top_bytes, dtype=np.uint8)
        vals = torch.from_numpy(planes.reshape(-1)).view(dtype).view(kept, last) if kept \
            else torch.zeros(0, last, dtype=dtype)
    if kept == n_rows:                                            # dense: no scatter
        return vals.reshape(shape)
    out = torch.zeros(n_rows, last, dtype=dtype)
    out[nonzero] = vals
    return out.view(shape)


def encoded_nbytes(enc) -> int:
    """Bytes of the tensors inside an encoding (or any nest of dicts / lists of them)."""
    if isinstance(enc, torch.Tensor):
        return enc.numel() * enc.element_size()
    if isinstance(enc, dict):
        return sum(encoded_nbytes(v) for v in enc.values())
    if isinstance(enc, (list, tuple)):
        return sum(encoded_nbytes(v) for v in enc)
    return 0

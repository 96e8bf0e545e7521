"""What every kernel family shares about launching: tile rounding, the product precision, and
the per-GPU tuning cache that supplies the default launch of a call.

Launch choices (tiles, warps, precisions, code paths) are frozen dataclasses that a caller
passes per call (`launch=`). When it passes none, the op asks `tuned(op, device, shape_class)`
for the cache's entry and falls back to the dataclass defaults. The cache is one JSON file per
GPU model, written by the tuning sweeps (`kernels/bsbr/tune.py`), so a sweep's winners are
data, not code edited by hand, and no module holds launch state that a benchmark or test
mutates.

    $GLASSBRAIN_TUNING_DIR/<gpu name>.json   (default ~/.cache/glassbrain/tuning)
    {"format": "glassbrain.tuning", "version": 1, "device": "NVIDIA H100 80GB HBM3",
     "entries": {"<op>": {"<shape class>": {field: value, ...}}}}

A shape class is a string the op builds from the sizes that change which launch wins (head
dims, dtype, top-k), with the sequence length bucketed to a power of two (`length_bucket`),
so a new prompt length never misses the cache.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TUNING_FORMAT, TUNING_VERSION = "glassbrain.tuning", 1


def pow2_tile(n: int, cap: int) -> int:
    """A tile size: at least 16 (tl.dot's minimum), at most the padded dimension or ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot input precision: float32 inputs multiply in IEEE float32 (tf32 would cost
    ~3e-4 relative error and break the float32 contract); 16-bit inputs natively."""
    return "ieee" if dtype == torch.float32 else "tf32"


def length_bucket(T: int) -> int:
    """The power of two at or above T: the length part of a shape class."""
    return 1 if T <= 1 else 1 << (int(T) - 1).bit_length()


def shape_class(**sizes) -> str:
    """A shape class from named sizes, in the order given (dtypes by name):
    shape_class(K=64, dtype=torch.bfloat16) == "K=64,dtype=bfloat16"."""
    return ",".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in sizes.items())


def tuning_dir() -> str:
    return os.environ.get("GLASSBRAIN_TUNING_DIR") or _home_tuning_dir()


# Memoised: calls that pass no launch resolve their default on every launch, so the path must
# cost little more than a dict lookup (os.path.expanduser and re.sub were ~5 µs a call).
@functools.lru_cache(maxsize=1)
def _home_tuning_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "glassbrain", "tuning")


def device_name(device: torch.device | str) -> str | None:
    """The GPU model a cache file belongs to; None off CUDA (the CPU has no tuning)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def _cache_path(name: str) -> str:
    return _cache_file(tuning_dir(), name)


@functools.lru_cache(maxsize=64)
def _cache_file(directory: str, name: str) -> str:
    return os.path.join(directory, re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".json")


_LOADED: dict[str, dict] = {}     # file contents by path, read once per process (a read cache)


def _entries(path: str) -> dict:
    if path not in _LOADED:
        entries = {}
        try:
            with open(path) as f:
                doc = json.load(f)
            if doc.get("format") == TUNING_FORMAT and doc.get("version") == TUNING_VERSION:
                entries = doc.get("entries", {})
        except (OSError, ValueError, AttributeError):
            entries = {}          # no file or an unreadable one: the built-in defaults apply
        _LOADED[path] = entries
    return _LOADED[path]


def tuned(op: str, device, shape_class: str) -> dict:
    """The tuning cache's fields for ``op`` at ``shape_class`` on ``device``'s GPU model, or {}
    (no cache, another GPU, the CPU)."""
    name = device_name(device)
    if name is None:
        return {}
    return dict(_entries(_cache_path(name)).get(op, {}).get(shape_class, {}))


def store_tuned(op: str, device, shape_class: str, fields: dict) -> str:
    """Record a sweep's winner; the file is replaced atomically. Returns its path."""
    name = device_name(device)
    if name is None:
        raise ValueError(f"device: the tuning cache is per GPU model, got {device}")
    path = _cache_path(name)
    entries = dict(_entries(path))
    entries.setdefault(op, {})[shape_class] = dict(fields)
    doc = {"format": TUNING_FORMAT, "version": TUNING_VERSION, "device": name,
           "entries": entries}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _LOADED[path] = entries
    return path


def with_tuned(default, op: str, device, shape_class: str):
    """``default`` (a frozen launch dataclass) with the cache's fields for this call applied;
    unknown or mistyped fields in the file are ignored rather than trusted, and so is an entry
    that the dataclass's own checks refuse (its defaults apply)."""
    entry = tuned(op, device, shape_class)
    if not entry:                         # the common case, kept cheap: one call per launch
        return default
    fields = {f.name for f in dataclasses.fields(default)}
    found = {k: v for k, v in entry.items()
             if k in fields and isinstance(v, type(getattr(default, k)))}
    if not found:
        return default
    try:
        return dataclasses.replace(default, **found)
    except (TypeError, ValueError):
        return default

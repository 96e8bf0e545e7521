"""The memory-wall CLI: JSON contract, flat BDH state, growing GPT-2 cache, OOM handling."""
import json

import pytest
import torch

from experiments import memory_wall

KEYS = {"model", "mode", "context", "peak_bytes", "state_bytes", "ms_per_token", "oom"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mw")
    memory_wall.main(["--max-tokens", "4096", "--decode-steps", "2", "--out", str(out)])
    return out, json.loads((out / "memory_wall.json").read_text())


def test_json_contract_and_files(run):
    out, res = run
    assert (out / "memory_wall.png").stat().st_size > 10_000
    assert (out / "memory_wall.md").read_text().startswith("| model |")
    meta, points = res["meta"], res["points"]
    for key in ("device", "dtype", "torch", "commit", "params"):
        assert key in meta
    assert meta["params"]["bdh"] > 0 and meta["params"]["gpt2"] > 0
    seen = set()
    for p in points:
        assert set(p) == KEYS
        assert p["mode"] in ("decode", "prefill") and isinstance(p["oom"], bool)
        assert isinstance(p["context"], int) and p["peak_bytes"] > 0 and p["ms_per_token"] > 0
        seen.add((p["model"], p["mode"]))
    assert seen == {("bdh", "decode"), ("bdh", "prefill"), ("gpt2-sdpa", "decode"),
                    ("gpt2-sdpa", "prefill"), ("gpt2-eager", "prefill")}
    assert sorted({p["context"] for p in points}) == [1024, 2048, 4096]


def test_bdh_state_is_flat_and_gpt2_cache_grows(run):
    _, res = run
    dec = {m: [p for p in res["points"] if p["model"] == m and p["mode"] == "decode"]
           for m in ("bdh", "gpt2-sdpa")}
    bdh_state = {p["state_bytes"] for p in dec["bdh"]}
    assert len(bdh_state) == 1                          # the same bytes at every context
    gpt = {p["context"]: p["state_bytes"] for p in dec["gpt2-sdpa"]}
    # KV cache = layers × (k, v) × context × d × 4 bytes: exactly linear in the context.
    assert gpt[2048] == 2 * gpt[1024] and gpt[4096] == 4 * gpt[1024]
    # BDH's decode peak (process RSS, sampled) stays within 15% across a 4× longer context:
    # the allowance is RSS noise (allocator and sampling), not growth.
    peaks = [p["peak_bytes"] for p in dec["bdh"]]
    assert max(peaks) < 1.15 * min(peaks)


class _OomAt2048(torch.nn.Module):
    """Stands in for a model that runs out of memory past 2047 tokens."""
    def forward(self, idx, state=None, return_state=False):
        if idx.shape[1] >= 2048:
            raise MemoryError("simulated")
        return torch.zeros(1, idx.shape[1], 256), None


def test_oom_is_recorded_and_ends_the_sweep(monkeypatch):
    monkeypatch.setattr(memory_wall, "build", lambda name, cfg: _OomAt2048())
    cfg = memory_wall.WallConfig(max_tokens=8192)
    points = []
    why = memory_wall.sweep("gpt2-eager", "prefill", cfg, points.append)
    assert [p["context"] for p in points] == [1024, 2048]
    assert [p["oom"] for p in points] == [False, True]
    assert points[1]["peak_bytes"] is None and "out of memory at 2048" in why


def test_bad_flags_fail_clearly():
    with pytest.raises(SystemExit, match="max-tokens"):
        memory_wall.main(["--max-tokens", "100"])
    with pytest.raises(ValueError, match="unknown model"):
        memory_wall.main(["--models", "mamba"])

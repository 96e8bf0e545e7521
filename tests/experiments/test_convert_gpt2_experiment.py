"""experiments.convert_gpt2 end to end on a tiny synthetic corpus (a smoke test of the outputs)."""
import json

from experiments import convert_gpt2


def synthetic_corpus():
    words = [b"the", b"king", b"shall", b"speak", b"of", b"love", b"and", b"war", b"now"]
    text = b" ".join(words[(i * 7 + i // 3) % len(words)] for i in range(3000))
    return {"train": text, "val": text[::-1], "test": text}


def test_convert_gpt2_runs_and_writes_outputs(tmp_path):
    result = convert_gpt2.main(["--steps", "10", "--contexts", "64,160", "--out", str(tmp_path)],
                               corpus=synthetic_corpus())
    for name in ("convert_gpt2.json", "convert_gpt2.md", "convert_gpt2.png"):
        assert (tmp_path / name).exists()
    saved = json.loads((tmp_path / "convert_gpt2.json").read_text())
    stages = [(r["model"].split()[0], r["stage"]) for r in saved["losses"]]
    assert stages == [("gpt2", "trained"), ("gpt2", "fine-tuned (control)"),
                      ("hebbian", "converted"), ("hebbian", "fine-tuned"),
                      ("bsbr", "converted"), ("bsbr", "fine-tuned")]
    assert set(result["acceptance"]) == {"hebbian", "bsbr"}
    mem = {(r["model"], r["context"]): r["cache_bytes"] for r in saved["memory"]}
    assert mem[("hebbian", 64)] == mem[("hebbian", 160)] > 0          # constant state
    assert mem[("gpt2", 160)] > mem[("gpt2", 64)]                      # the KV cache grows
    assert mem[("bsbr", 160)] > mem[("bsbr", 64)]                      # one slot per chunk

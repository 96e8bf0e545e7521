"""experiments.serve_bench on tiny settings: both servers decode, the KV caches grow with the
context while BDH's state does not, and the resume measurement says which codecs are lossless."""
import json

from experiments import serve_bench


def test_serve_bench_tiny(tmp_path):
    out = tmp_path / "bench"
    result = serve_bench.main(["--sessions", "1,3", "--contexts", "16,48", "--steps", "2",
                               "--resume-model", "small", "--resume-context", "20",
                               "--out", str(out)])
    for name in ("serve_bench.json", "serve_bench.md", "serve_bench.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "serve_bench.json").read_text())
    assert len(saved["points"]) == len(result["points"]) == 2 * 2 * 2
    per = {(p["model"], p["context"], p["sessions"]): p for p in saved["points"]}
    assert all(p["tokens_per_s"] > 0 and not p["oom"] for p in per.values())
    assert per[("bdh", 16, 1)]["state_bytes_per_session"] == \
        per[("bdh", 48, 3)]["state_bytes_per_session"]
    assert per[("gpt2", 48, 1)]["state_bytes_per_session"] == \
        3 * per[("gpt2", 16, 1)]["state_bytes_per_session"]
    assert per[("gpt2", 16, 3)]["state_bytes_total"] == \
        3 * per[("gpt2", 16, 1)]["state_bytes_total"]
    lossless = {r["codec"]: r["lossless"] for r in saved["resume"]}
    assert lossless == {"raw": True, "rows": True, "zlib": True, "bf16": False}
    assert all(r["resume_s"] > 0 and r["disk_read_bytes_per_s"] > 0 for r in saved["resume"])

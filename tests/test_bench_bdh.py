"""The BDH benchmark's code paths run on the CPU (a smoke; timings need a GPU)."""
import json

from experiments import bench_bdh


def test_bench_bdh_cpu_smoke(tmp_path):
    rows = bench_bdh.main(["--items", "prefill,generate", "--out", str(tmp_path)])
    items = {(r["item"], r["impl"]) for r in rows}
    assert {("prefill", "ours"), ("prefill stream", "ours"), ("generate", "ours")} <= items
    assert all(r["tok/s"] > 0 for r in rows)
    saved = json.loads((tmp_path / "bench_bdh.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["official"] is False

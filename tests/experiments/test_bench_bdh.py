"""The BDH benchmark's code paths run on the CPU (a smoke; timings need a GPU), with a tiny
stand-in for the official bdh.py written here (same names and call signatures, not its code)."""
import json

import pytest

from experiments import bench_bdh

STAND_IN = '''
import dataclasses
import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class BDHConfig:
    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256


class BDH(nn.Module):
    """A causal bag-of-embeddings LM: the official interface, none of its maths."""
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(self.embed(idx).cumsum(1))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):          # re-runs the prefix, as the official one does
            logits, _ = self(idx)
            idx = torch.cat((idx, logits[:, -1:].argmax(-1)), dim=1)
        return idx
'''


def test_bench_bdh_cpu_smoke_with_official_stand_in(tmp_path):
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "bdh.py").write_text(STAND_IN)
    rows = bench_bdh.main(["--official-bdh", str(tmp_path / "official"),
                           "--out", str(tmp_path / "out")])
    failed = [r for r in rows if r["note"] and r["note"].startswith("failed")]
    assert not failed, failed
    items = {(r["item"], r["impl"]) for r in rows}
    assert {("train step", "ours eager"), ("train step", "official eager"),
            ("prefill", "ours"), ("prefill", "official"), ("prefill stream", "ours"),
            ("generate", "ours"), ("generate", "official")} <= items
    assert all(r["tok/s"] > 0 and r["peak GB"] > 0 for r in rows)
    # Same-shape comparisons against the (stand-in) official model are filled in.
    by = {(r["item"], r["impl"], r["shape"]): r for r in rows}
    assert by[("train step", "ours eager", "B2 T64")]["vs official"] > 0
    assert by[("prefill", "ours", "B1 T256")]["vs official"] > 0
    assert by[("generate", "ours", "prompt 128, 4 new")]["vs official"] > 0
    saved = json.loads((tmp_path / "out" / "bench_bdh.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["official"] is True
    assert len(saved["meta"]["official_sha256"]) == 64 and saved["meta"]["smoke"] is True
    assert (tmp_path / "out" / "bench_bdh.md").read_text().count("\n| ") == len(rows) + 1


def test_bench_bdh_sparse_item_with_a_trained_checkpoint(tmp_path):
    """The sparse item decodes a train checkpoint and random weights, dense and sparse, and says
    how often the two greedy continuations agree (eager on the CPU, so they must agree)."""
    from experiments import train
    corpus = {"train": bytes(range(256)) * 8, "val": bytes(range(256)) * 2,
              "test": bytes(range(256))}
    train.main(["--steps", "2", "--eval-every", "2", "--ckpt-dir", str(tmp_path / "ck"),
                "--out", str(tmp_path / "tr"), "--bdh", "n_layer=1,n_embd=32,n_head=2,"
                "mlp_internal_dim_multiplier=8"], corpus=corpus)
    import experiments.data as data
    real = data.load_corpus
    data.load_corpus = lambda name="shakespeare": corpus
    try:
        rows = bench_bdh.main(["--items", "sparse", "--checkpoint",
                               str(tmp_path / "ck" / "bdh.pt"), "--out", str(tmp_path / "out")])
    finally:
        data.load_corpus = real
    assert not [r for r in rows if r["note"].startswith("failed")]
    got = {(r["weights"], r["impl"], r["batch"], r["prompt"]) for r in rows}
    assert got == {(w, f"ours {k} (eager)", B, P) for w in ("trained", "random")
                   for k in ("dense", "sparse", "sparse unfused")
                   for B, P in ((1, 128), (1, 300), (2, 128))}
    for r in rows:
        assert r["tok/s"] > 0 and 0 < r["density"]["xs"] < 1 and 0 < r["density"]["xy"] < 1
        if "sparse" in r["impl"]:
            assert r["same_sequences"] == r["batch"] and r["token_agreement"] == 1.0
            assert "x dense" in r["note"]
    saved = json.loads((tmp_path / "out" / "bench_bdh.json").read_text())
    assert saved["meta"]["checkpoint"]["step"] == 2


def test_bench_bdh_sparse_refuses_a_foreign_checkpoint(tmp_path, capsys):
    from glassbrain.atomic_file import save_checked
    save_checked({"model": {}, "config": {"model": "gpt2"}}, tmp_path / "g.pt")
    with pytest.raises(SystemExit) as e:
        bench_bdh.main(["--items", "sparse", "--checkpoint", str(tmp_path / "g.pt"),
                        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--checkpoint: " in err and "not a BDH training checkpoint" in err
    assert not (tmp_path / "out").exists()                    # refused before any output


@pytest.mark.parametrize("flags, words", [
    (["--items", "train,fly"], "--items: expected a comma list of train, prefill"),
    (["--checkpoint", "/missing.pt"], "--checkpoint: expected an existing file, got '/missing.pt'"),
    (["--reps", "0"], "--reps: expected an int >= 1"),
])
def test_bench_bdh_bad_flags(tmp_path, flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        bench_bdh.main(flags + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and not (tmp_path / "out").exists(), err


def test_official_folder_without_bdh_py_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_bdh.main(["--official-bdh", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "--official-bdh: expected a folder holding bdh.py" in capsys.readouterr().err
    (tmp_path / "bdh.py").write_text("X = 1\n")               # a bdh.py without the classes
    with pytest.raises(SystemExit):
        bench_bdh.main(["--official-bdh", str(tmp_path), "--out", str(tmp_path / "out")])
    assert "defines no BDH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_sparse_is_the_sparse_item(tmp_path, capsys, monkeypatch):
    from experiments import bench_sparse
    seen = []
    monkeypatch.setattr(bench_bdh, "main", lambda argv: seen.append(argv) or [])
    bench_sparse.main(["--out", str(tmp_path)])
    assert seen == [["--items", "sparse", "--out", str(tmp_path)]]
    with pytest.raises(SystemExit):
        bench_sparse.main(["--items", "train"])
    assert "--items: experiments.bench_sparse runs the sparse item only" in \
        capsys.readouterr().err

"""experiments.train on several gloo processes: the run of 2 ranks is the run of one process
(the global batch is the same, 5 rows split 2 + 3), its checkpoint means what one process's
does, and it resumes on 1 process (DDP) and on 3 (FSDP), continuing the same loss curve."""
import shutil

import pytest
import torch
from helpers import assert_rel_close
from ranks import run_ranks

from experiments import train as tr
from experiments.results import load_torch

TEXT = (b"the quick brown fox jumps over the lazy dog. " * 200)
CORPUS = {"train": TEXT, "val": TEXT[:3000], "test": TEXT[:3000]}
TOL = 1e-4            # a few AdamW steps apart from one process's float rounding


def config(ckpt_dir, steps, *extra):
    cfg = tr.config_from_args(["--model", "bdh", "--steps", str(steps), "--batch-size", "5",
                               "--block-size", "24", "--eval-every", "2", "--eval-batches", "1",
                               "--log-every", "1", "--lr", "0.01", "--ckpt-dir", str(ckpt_dir),
                               "--out", str(ckpt_dir / "out"), *extra])
    cfg.bdh = dict(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
    return cfg


def ranked_train(rank, world, ckpt_dir, steps, extra):
    log = tr.train(config(ckpt_dir, steps, *extra), CORPUS)
    return {"losses": [e["loss"] for e in log["train"]], "meta": log["meta"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    one, two = tmp / "one", tmp / "two"
    first = tr.train(config(one, 4), CORPUS)                      # one process, 4 steps
    ranked = run_ranks(ranked_train, 2, tmp, two, 4, ())            # 2 ranks, 4 steps
    ckpt_one, ckpt_two = load_torch(one / "bdh.pt"), load_torch(two / "bdh.pt")
    on_disk = sorted(p.name for p in two.iterdir())
    three = tmp / "three"
    shutil.copytree(two, three)
    full = tr.train(config(one, 6, "--resume"), CORPUS)            # one process, 6 steps
    resumed_1 = tr.train(config(two, 6, "--resume"), CORPUS)      # 2 ranks -> 1 process
    resumed_3 = run_ranks(ranked_train, 3, tmp, three, 6, ("--resume", "--fsdp"))
    return dict(first=first, ranked=ranked, ckpt_one=ckpt_one, ckpt_two=ckpt_two,
                on_disk=on_disk, full=full, resumed_1=resumed_1, resumed_3=resumed_3,
                final_one=load_torch(one / "bdh.pt"), final_three=load_torch(three / "bdh.pt"))


def test_two_ranks_train_as_one_process(runs):
    want = [e["loss"] for e in runs["first"]["train"]]
    for rank_out in runs["ranked"]:               # every rank logs the global mean
        assert rank_out["losses"] == pytest.approx(want, rel=TOL)
        assert rank_out["meta"]["world_size"] == 2
    assert "world_size" not in runs["first"]["meta"]
    assert runs["on_disk"] == ["bdh.pt", "out"]   # rank 0 wrote it, atomically (no temp file)


def _assert_same_checkpoint(got, want):
    assert got["step"] == want["step"] and got["config"]["batch_size"] == 5
    assert got["model"].keys() == want["model"].keys()
    for name in want["model"]:
        assert_rel_close(got["model"][name], want["model"][name], TOL, name)
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    for i, state in want["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert_rel_close(got["optimizer"]["state"][i][key], state[key], 1e-3, f"{i} {key}")
    assert torch.equal(got["batches"]["generator"], want["batches"]["generator"])


def test_the_checkpoint_of_two_ranks_is_one_process_checkpoint(runs):
    _assert_same_checkpoint(runs["ckpt_two"], runs["ckpt_one"])


@pytest.mark.parametrize("where", ["resumed_1", "resumed_3"])
def test_a_two_rank_checkpoint_resumes_on_one_and_three(runs, where):
    want = [e["loss"] for e in runs["full"]["train"]]
    got = runs[where]["train"] if where == "resumed_1" else None
    losses = [e["loss"] for e in got] if got is not None else runs[where][0]["losses"]
    assert losses == pytest.approx(want, rel=TOL)
    assert len(losses) == 6


def test_an_fsdp_checkpoint_is_one_process_checkpoint(runs):
    _assert_same_checkpoint(runs["final_three"], runs["final_one"])


def test_fsdp_on_one_process_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        tr.config_from_args(["--fsdp"])
    assert e.value.code == 2
    assert "--fsdp: shards over the processes of torchrun" in capsys.readouterr().err

"""Data parallelism on 2 gloo processes: one step of each rank on its rows of the global batch
gives the loss and every gradient of one process on the whole batch (batch 5: uneven rows),
under DDP and FSDP2."""
import pytest
import torch
from helpers import assert_rel_close
from ranks import run_ranks

from experiments import distributed

TOL = 1e-5
BATCH, BLOCK = 5, 24


def make_model(name):
    torch.manual_seed(0)
    if name == "bdh":
        from bdh import BDH, BDHConfig
        return BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8,
                             dropout=0.0))
    from baselines.lm import MixerLM, MixerLMConfig
    return MixerLM(MixerLMConfig(mixer="linear", n_layer=2, d_model=32, n_head=2))


def global_batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (BATCH, BLOCK + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def full_grads(model):
    """Parameter gradients by name, whole tensors (FSDP's are sharded DTensors)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def one_step(rank, world, fsdp):
    out = {}
    dp = distributed.start("cpu", fsdp=fsdp)
    assert (dp.rank, dp.world_size) == (rank, world)
    x, y = global_batch()
    rows = dp.rows(BATCH)
    for name in ("bdh", "mixer"):
        model = make_model(name)
        forward = dp.wrap(model)
        _, loss = forward(x[rows], y[rows])
        (loss * dp.loss_weight(BATCH)).backward()
        out[name] = {"loss": dp.global_mean(float(loss), BATCH, "cpu"),
                     "grads": full_grads(model)}
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["ddp", "fsdp"])
def stepped(request, tmp_path_factory):
    return run_ranks(one_step, 2, tmp_path_factory.mktemp("dp"), request.param)


@pytest.mark.parametrize("name", ["bdh", "mixer"])
def test_a_step_equals_one_process_on_the_whole_batch(stepped, name):
    model = make_model(name)
    x, y = global_batch()
    _, loss = model(x, y)
    loss.backward()
    for rank_out in stepped:
        got = rank_out[name]
        assert got["loss"] == pytest.approx(float(loss.detach()), rel=TOL)
        assert got["grads"].keys() == dict(model.named_parameters()).keys()
        for n, p in model.named_parameters():
            assert_rel_close(got["grads"][n], p.grad, TOL, f"{name} d{n}")


def test_rows_cover_the_batch_once():
    for world in (1, 2, 3, 4):
        ranks = [distributed.DataParallel(r, world) for r in range(world)]
        rows = [dp.rows(10) for dp in ranks]
        assert [i for s in rows for i in range(s.start, s.stop)] == list(range(10))
        # DDP averages over ranks a mean over each rank's rows: every row must weigh 1/10.
        per_row = [dp.loss_weight(10) / (world * (s.stop - s.start)) for dp, s in
                   zip(ranks, rows)]
        assert per_row == pytest.approx([0.1] * world)
    assert distributed.SINGLE.loss_weight(7) == 1.0


def test_fsdp_needs_several_processes():
    with pytest.raises(ValueError, match="--fsdp: shards over the processes of torchrun"):
        distributed.start("cpu", fsdp=True)

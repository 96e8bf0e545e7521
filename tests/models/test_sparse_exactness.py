"""Sparse decoding is the dense model: the two `BDHDecoder` paths fed the same tokens
(`experiments.sparse_exactness.teacher_forced`) give the same logits in float32, step after
step, at batch 3 with rows at different positions (the unfused sparse kernels) and at one
position (the fused ones), on the Triton kernels (interpreted on the CPU) and the PyTorch ones.

The line: float32 summation order alone gives a relative logit difference of ~1e-6, and we hold
1e-5. A top-1 flip then needs a dense top-2 margin of at most √2 · 1e-5 of the logit norm, so
above MARGIN (ten times that) the two paths must pick the same token."""
import pytest
import torch

from bdh import BDHState
from bdh.decode import BDHDecoder
from experiments.sparse_exactness import logit_stats, summarise, teacher_forced
from test_bdh_streaming import make_model       # small BDH (N = 128), sharpened logits

REL_LINE = 1e-5
MARGIN = 1.5e-4
STEPS = {"torch": 32, "triton": 12}      # the interpreted kernels take ~0.6 s a step


def state_after(model, lengths):
    """One state of len(lengths) rows, row b after lengths[b] random tokens."""
    rows = []
    for T in lengths:
        dec = BDHDecoder(model, 1, "eager")
        dec.prefill(torch.randint(0, 256, (1, T)))
        rows.append(dec.state.clone())
    return BDHState.cat(rows)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lengths", [(5, 37, 300), (40, 40, 40)])
def test_teacher_forced_sparse_logits_equal_dense(backend, lengths):
    model = make_model()
    state = state_after(model, lengths)
    before = [S.clone() for S in state.layers]
    n = STEPS[backend]
    forced = torch.randint(0, 256, (3, n))
    steps = teacher_forced(model, state, forced[:, 0], n, forced=forced[:, 1:], backend=backend)
    assert len(steps) == n and all(len(s["rel"]) == 3 for s in steps)
    s = summarise(steps)
    assert s["max_rel"] <= REL_LINE, f"sparse vs dense: rel {s['max_rel']:.2e} > {REL_LINE}"
    assert s["max_rel"] > 0                      # two computations, not one read twice
    for i, st in enumerate(steps):
        for b, (flip, m) in enumerate(zip(st["flip"], st["rel_margin"])):
            assert not (flip and m > MARGIN), f"step {i} row {b}: top-1 flipped at margin {m}"
    assert s["median_rel_margin"] > 10 * MARGIN   # the margins tested are mostly clear ones
    for S, S0 in zip(state.layers, before):        # both paths stepped copies
        assert torch.equal(S, S0)


def test_greedy_forcing_feeds_the_dense_choice_to_both():
    """Without forced tokens both paths read the dense argmax: the dense logits of every step
    are those of the dense decoder decoding greedily on its own (its top-2 margins match)."""
    model = make_model(1)
    state = state_after(model, (9, 20))
    first = torch.randint(0, 256, (2,))
    steps = teacher_forced(model, state, first, 6, backend="torch")
    assert summarise(steps)["max_rel"] <= REL_LINE
    alone = BDHDecoder(model, 2, "eager", state=state.clone())
    tok = first
    for i in range(6):
        logits = alone.step(tok)
        own = logit_stats(logits, logits)
        assert own["rel"] == [0.0, 0.0]
        assert steps[i]["margin"] == pytest.approx(own["margin"], rel=1e-9), f"step {i}"
        tok = logits.argmax(-1)
    other = teacher_forced(model, state, first, 6, forced=torch.randint(0, 256, (2, 5)),
                           backend="torch")
    assert [s["margin"] for s in other[1:]] != [s["margin"] for s in steps[1:]]


def test_logit_stats_sees_a_flip_and_its_margin():
    dense = torch.tensor([[3.0, 2.9, 0.0, -1.0], [0.0, 4.0, 1.0, 0.0]])
    sparse = dense.clone()
    sparse[0, 1] = 3.2                                   # row 0 flips its near-tie
    s = logit_stats(sparse, dense)
    assert s["flip"] == [True, False]
    assert s["margin"][0] == pytest.approx(0.1) and s["margin"][1] == pytest.approx(3.0)
    assert s["rel"][0] == pytest.approx(0.3 / dense[0].norm().item())
    assert s["rel"][1] == 0.0
    summary = summarise([s])
    assert summary["top1_differs"] == 0.5
    assert summary["max_flip_rel_margin"] == pytest.approx(0.1 / dense[0].norm().item())

"""experiments.tasks: seeded long-range memory task generators, their oracles, the accuracy
function and the curriculum."""
import numpy as np
import pytest
import torch

from experiments import tasks as T
from experiments.tasks import MASK, PAD, SEP, Curriculum, Phase

NAMES = tuple(T.TASKS)
SHAPES = [(3, 37, 64), (2, 64, 100), (1, 129, 257)]        # (batch, length, vocab): awkward ones


def one_hot_logits(pred, vocab):
    return torch.nn.functional.one_hot(pred, vocab).float() + 0.01 * torch.randn(
        *pred.shape, vocab)            # noise far below the one-hot margin


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_by_seed_and_different_across_seeds(name):
    a = T.make(name, 3, 48, vocab=64, seed=5)
    b = T.make(name, 3, 48, vocab=64, seed=5)
    c = T.make(name, 3, 48, vocab=64, seed=6)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,L,V", SHAPES)
def test_shapes_dtypes_and_next_token_targets(name, B, L, V):
    x, y, m = T.make(name, B, L, vocab=V, seed=1)
    assert x.shape == y.shape == m.shape == (B, L)
    assert x.dtype == y.dtype == torch.long and m.dtype == torch.bool
    assert torch.equal(y[:, :-1], x[:, 1:])                  # targets are the next tokens
    assert int(x.min()) >= 0 and int(x.max()) < V and int(y.max()) < V
    assert bool(m.any(1).all())                               # every sequence has answers


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,L,V", SHAPES)
def test_oracle_reading_only_the_prefix_scores_100_percent(name, B, L, V):
    """Every answer is recoverable from the tokens before it: the oracle sees input_ids[:t+1]
    only (oracle_predictions slices the prefix), and gets every answer right."""
    x, y, m = T.make(name, B, L, vocab=V, seed=2)
    pred = T.oracle_predictions(name, x, m)
    acc = T.accuracy(one_hot_logits(pred, V), y, m)
    assert acc["acc"] == 1.0 and acc["seq_acc"] == 1.0
    assert acc["answers"] == int(m.sum()) and acc["sequences"] == B


@pytest.mark.parametrize("name", NAMES)
def test_answers_do_not_depend_on_later_tokens(name):
    """Scramble everything after an answer position: the oracle's answer there must not move
    (it is a function of the prefix), and it must still equal the target."""
    x, y, m = T.make(name, 2, 60, vocab=80, seed=3)
    g = torch.Generator().manual_seed(0)
    for b, t in zip(*torch.nonzero(m, as_tuple=True)):
        b, t = int(b), int(t)
        x2 = x.clone()
        x2[b, t + 1:] = torch.randint(0, 80, (x.shape[1] - t - 1,), generator=g)
        only = torch.zeros_like(m)
        only[b, t] = True
        assert int(T.oracle_predictions(name, x2, only)[b, t]) == int(y[b, t])


def _expected_answer_mask(name, x, y, V):
    """The answer positions, rebuilt from each task's layout independently of the generator."""
    B, L = x.shape
    s = torch.cat([x, y[:, -1:]], 1).numpy()                 # the stream, T+1 tokens
    want = np.zeros((B, L + 1), dtype=bool)
    for b in range(B):
        seps = np.flatnonzero(s[b] == SEP)
        if name == "copy":
            n = seps[0]
            want[b, n + 1:2 * n + 1] = True
        elif name == "mqar":
            half = (V - 4) // 2
            keys = (s[b] >= 4) & (s[b] < 4 + half)
            first = {}
            for i in np.flatnonzero(keys):
                if s[b, i] in first:
                    want[b, i + 1] = True                      # a repeated key: its value answers
                first.setdefault(s[b, i], i)
        elif name == "needle":
            sep = seps[-1]
            want[b, sep + 2::2] = True
        elif name == "infill":
            s2 = seps[1]
            n_mask = int((s[b] == MASK).sum())
            want[b, s2 + 1:s2 + 1 + n_mask] = True
        elif name == "multihop":
            sep = seps[0]
            n = sep // 4
            want[b, sep + 2:sep + 2 + 2 * n:2] = True
    return torch.from_numpy(want[:, 1:])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("B,L,V", SHAPES[:2])
def test_loss_mask_is_exactly_the_answer_positions(name, B, L, V):
    x, y, m = T.make(name, B, L, vocab=V, seed=4)
    assert torch.equal(m, _expected_answer_mask(name, x, y, V))
    assert not bool((y[m] < 4).any())                  # answers are content, never PAD/SEP/MASK


def test_mqar_layout_is_zoology():
    V, N, L = 68, 8, 64
    x, y, m = T.make("mqar", 4, L, N, V, seed=7)
    s = torch.cat([x, y[:, -1:]], 1)
    half = (V - 4) // 2
    keys, vals = s[:, 0:2 * N:2], s[:, 1:2 * N:2]
    assert bool(((keys >= 4) & (keys < 4 + half)).all())
    assert bool(((vals >= 4 + half) & (vals < V)).all())
    for b in range(4):
        assert len(set(keys[b].tolist())) == N                  # distinct keys
        assert int(m[b].sum()) == N                              # each key asked once
        rest = s[b, 2 * N:]
        asked = rest[(rest >= 4) & (rest < 4 + half)]
        assert sorted(asked.tolist()) == sorted(keys[b].tolist())
        # outside the queries the rest is PAD
        assert int((rest != PAD).sum()) == 2 * N
        # before its query, an answer appears only in the kv context, right after its key
        for t in torch.nonzero(m[b]).flatten().tolist():
            seen = torch.nonzero(x[b, :t + 1] == y[b, t]).flatten().tolist()
            assert seen and all(i < 2 * N and i % 2 == 1 for i in seen)
            assert any(int(x[b, i - 1]) == int(x[b, t]) for i in seen)


def test_mqar_gaps_favour_short_distances():
    x, y, m = T.make("mqar", 64, 256, 16, 256, seed=0)
    pos = torch.nonzero(m)[:, 1].float() - 32
    assert float((pos < 112).float().mean()) > 0.5             # power law: most queries early


def test_needle_keys_occur_only_in_the_needle_and_the_query():
    x, y, m = T.make("needle", 4, 200, 3, 128, seed=1)
    for b in range(4):
        for t in torch.nonzero(m[b]).flatten().tolist():
            key = int(x[b, t])
            assert int((x[b] == key).sum()) == 2


def test_multihop_chain_needs_two_hops():
    x, y, m = T.make("multihop", 2, 64, 5, 64, seed=3)
    for b in range(2):
        sep = int(torch.nonzero(x[b] == SEP)[0])
        pairs = x[b, :sep].view(-1, 2).tolist()
        succ = dict(map(tuple, pairs))
        for t in torch.nonzero(m[b]).flatten().tolist():
            a, c = int(x[b, t]), int(y[b, t])
            assert succ[succ[a]] == c and succ[a] != c          # a → b → c, not a → c


def test_accuracy_on_hand_made_cases():
    V = 5
    targets = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1], [0, 0, 0, 0]])
    mask = torch.tensor([[False, True, True, False], [True, True, False, False],
                         [False, False, False, False]])
    pred = torch.tensor([[0, 2, 3, 0], [4, 0, 2, 1], [1, 1, 1, 1]])
    logits = torch.nn.functional.one_hot(pred, V).float()
    acc = T.accuracy(logits, targets, mask)
    # row 0: 2✓ 3✓; row 1: 4✓ 3✗ → 3/4 right; 2 rows have answers, row 0 all right
    assert acc == {"acc": 0.75, "seq_acc": 0.5, "answers": 4, "sequences": 2}
    # wrong predictions outside the mask do not count
    logits2 = torch.nn.functional.one_hot(targets, V).float()
    assert T.accuracy(logits2, targets, mask)["acc"] == 1.0


def test_accuracy_rejects_bad_input():
    lg = torch.randn(2, 3, 4)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one answer"):
        T.accuracy(lg, y, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="targets, loss_mask"):
        T.accuracy(lg, y[:, :2], torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="loss_mask"):
        T.accuracy(lg, y, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="logits"):
        T.accuracy(y, y, torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_name_the_argument(name):
    with pytest.raises(ValueError, match="batch"):
        T.make(name, 0, 32, vocab=64)
    with pytest.raises(ValueError, match="seed"):
        T.make(name, 1, 32, vocab=64, seed=-1)
    with pytest.raises(ValueError, match="difficulty"):
        T.make(name, 1, 32, difficulty=1000, vocab=64)
    with pytest.raises(ValueError, match="difficulty"):
        T.make(name, 1, 32, difficulty=0, vocab=64)
    with pytest.raises(ValueError, match="vocab"):
        T.make(name, 1, 32, vocab=3)
    with pytest.raises(ValueError, match="length"):
        T.make(name, 1, 1, vocab=64)
    with pytest.raises(ValueError, match="task"):
        T.make("nope", 1, 32)


def test_difficulty_scales_with_length():
    assert T.get_task("mqar").default_difficulty(256, 8192) == 64      # Zoology: T/4 pairs
    assert T.get_task("mqar").default_difficulty(1024, 8192) == 256
    for name in NAMES:
        mod = T.get_task(name)
        assert mod.default_difficulty(256, 512) >= mod.default_difficulty(64, 512) >= 1


# ---- curriculum -------------------------------------------------------------------------

def _cur(**kw):
    phases = (Phase(32, ("copy", "mqar")), Phase(64, ("copy", "mqar", "infill")))
    return Curriculum(phases, vocab=64, **{"threshold": 0.9, "window": 2, **kw})


def test_curriculum_holds_below_threshold_and_with_a_short_window():
    c = _cur()
    assert c.update("copy", 1.0) == "hold"                   # window not full yet
    assert c.update("copy", 0.5) == "hold"                   # mean 0.75 < 0.9
    assert c.update("copy", 0.7) == "hold"                   # window (0.5, 0.7)
    assert c.level == {"copy": 0, "mqar": 0} and c.phase == 0


def test_curriculum_steps_levels_then_phases():
    c = _cur()
    d0 = c.difficulty("mqar")
    assert d0 == round(0.25 * T.get_task("mqar").default_difficulty(32, 64))
    assert [c.update("mqar", 0.95) for _ in range(2)] == ["hold", "level"]
    assert c.difficulty("mqar") > d0 and c.level["copy"] == 0
    for _ in range(4):
        c.update("mqar", 1.0)                               # to level 2, then passed
    assert c.phase == 0                                       # copy still at level 0
    events = [c.update("copy", 1.0) for _ in range(6)]
    assert events[-1] == "phase" and events.count("level") == 2
    assert c.phase == 1 and c.current.length == 64
    assert c.level == {"copy": 0, "mqar": 0, "infill": 0}
    task, length, diff = c.sample(np.random.default_rng(0))
    assert task in ("copy", "mqar", "infill") and length == 64 and diff == c.difficulty(task)


def test_curriculum_last_phase_keeps_training_at_the_top_and_state_round_trips():
    c = Curriculum((Phase(32, ("mqar",), (0.5, 1.0)),), vocab=64, threshold=0.5, window=1)
    assert [c.update("mqar", 1.0) for _ in range(3)] == ["level", "hold", "hold"]
    assert c.done and c.difficulty("mqar") == T.get_task("mqar").default_difficulty(32, 64)
    c2 = _cur()
    c2.update("copy", 1.0)
    c2.update("copy", 1.0)
    c2.update("mqar", 0.3)
    c3 = _cur()
    c3.load_state_dict(c2.state_dict())
    assert c3.state_dict() == c2.state_dict()
    with pytest.raises(ValueError, match="other phases"):
        Curriculum((Phase(32, ("copy",)),), vocab=64).load_state_dict(c2.state_dict())


def test_curriculum_rejects_bad_settings():
    with pytest.raises(ValueError, match="threshold"):
        _cur(threshold=1.5)
    with pytest.raises(ValueError, match="window"):
        _cur(window=0)
    with pytest.raises(ValueError, match="task"):
        Curriculum((Phase(32, ("nope",)),), vocab=64)
    with pytest.raises(ValueError, match="not in the current phase"):
        _cur().update("infill", 1.0)
    for phases in T.CURRICULA.values():                   # the shipped curricula are valid
        Curriculum(phases, vocab=8192)
    assert [p.length for p in T.CURRICULA["full"]] == [512, 1024, 2048]
    assert set(T.CURRICULA["full"][-1].tasks) == set(NAMES)

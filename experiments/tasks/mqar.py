"""Multi-query associative recall in the Zoology form (Arora et al. 2023).

    k_1 v_1 k_2 v_2 … k_N v_N   then, in the rest of the sequence, each key once more at a
    power-law gap, followed by its value; PAD everywhere else.

Keys come from the lower half of the content vocabulary, values from the upper half; the keys
and the values of one sequence are distinct. difficulty = N, the number of pairs (Zoology's
num_kv_pairs). The answer at a query is the value paired with that key in the context.
"""
from __future__ import annotations

import numpy as np

from .common import N_SPECIAL, finish, follower_of_first, power_law_slots, start

NAME = "mqar"


def _halves(vocab: int) -> tuple[int, int]:
    half = (vocab - N_SPECIAL) // 2
    return half, N_SPECIAL + half          # number of keys (= values), first value token


def max_difficulty(length: int, vocab: int) -> int:
    # N pairs in the context and N query slots of two tokens each in the rest of T+1 tokens.
    return min((length + 1) // 4, _halves(vocab)[0])


def default_difficulty(length: int, vocab: int) -> int:
    return min(max(1, length // 4), max_difficulty(length, vocab))   # Zoology: T/4 pairs


def make(batch: int, length: int, difficulty: int | None = None, vocab: int = 128, seed: int = 0,
         alpha: float = 0.1):
    difficulty, rng, s, ans = start(NAME, batch, length, difficulty, vocab, seed,
                                    default_difficulty=default_difficulty,
                                    max_difficulty=max_difficulty)
    N = difficulty
    n_keys, v0 = _halves(vocab)
    ctx = 2 * N
    space = (length + 1 - ctx) // 2
    for b in range(batch):
        keys = N_SPECIAL + rng.choice(n_keys, size=N, replace=False)
        vals = v0 + rng.choice(n_keys, size=N, replace=False)      # distinct, as in Zoology
        s[b, 0:ctx:2], s[b, 1:ctx:2] = keys, vals
        slots = power_law_slots(rng, space, N, alpha)
        order = rng.permutation(N)                      # which key each slot asks about
        pos = ctx + 2 * slots
        s[b, pos], s[b, pos + 1] = keys[order], vals[order]
        ans[b, pos + 1] = True
    return finish(s, ans)


def oracle(prefix: np.ndarray) -> int:
    return follower_of_first(prefix, int(prefix[-1]))

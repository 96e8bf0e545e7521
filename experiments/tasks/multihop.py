"""Multi-hop associative recall: pairs ``a b`` and ``b c`` (shuffled), SEP, then queries ``a c``.

Each chain a → b → c uses three distinct tokens; the 2·n pairs of n chains are listed in random
order (so b → c may come before a → b), then after SEP every chain start a is asked once, in
random order, and the answer is c: two lookups, the second keyed by the first's result.
difficulty = n, the number of chains.
"""
from __future__ import annotations

import numpy as np

from .common import N_SPECIAL, SEP, finish, follower_of_first, start

NAME = "multihop"


def max_difficulty(length: int, vocab: int) -> int:
    return min(length // 6, (vocab - N_SPECIAL) // 3)     # 4n pair tokens + SEP + 2n queries


def default_difficulty(length: int, vocab: int) -> int:
    return min(max(1, length // 8), max_difficulty(length, vocab))


def make(batch: int, length: int, difficulty: int | None = None, vocab: int = 128, seed: int = 0):
    difficulty, rng, s, ans = start(NAME, batch, length, difficulty, vocab, seed,
                                    default_difficulty=default_difficulty,
                                    max_difficulty=max_difficulty)
    n = difficulty
    P = 4 * n                                   # pair-section tokens
    for b in range(batch):
        a, m, c = (N_SPECIAL + rng.choice(vocab - N_SPECIAL, size=3 * n, replace=False)
                   ).reshape(3, n)
        pairs = np.concatenate([np.stack([a, m], 1), np.stack([m, c], 1)])[rng.permutation(2 * n)]
        s[b, :P] = pairs.reshape(-1)
        s[b, P] = SEP
        order = rng.permutation(n)
        s[b, P + 1:P + 1 + 2 * n:2], s[b, P + 2:P + 2 + 2 * n:2] = a[order], c[order]
        ans[b, P + 2:P + 2 + 2 * n:2] = True
    return finish(s, ans)


def oracle(prefix: np.ndarray) -> int:
    sep = int(np.flatnonzero(prefix == SEP)[0])
    pairs = prefix[:sep + 1]                    # pair starts sit at even positions
    mid = follower_of_first(pairs, int(prefix[-1]), stop=sep, parity=0)
    return follower_of_first(pairs, mid, stop=sep, parity=0)

"""Needle in a haystack: ``filler … k v … filler SEP k v``.

Filler tokens come from the upper half of the content vocabulary, needle keys from the first
quarter and values from the second, so a key occurs only in its needle. difficulty = the number
of needles (distinct keys) hidden at random depths; after SEP every needle's key is asked once,
in random order, and the answer is its value.
"""
from __future__ import annotations

import numpy as np

from .common import N_SPECIAL, SEP, finish, follower_of_first, start

NAME = "needle"


def _ranges(vocab: int):
    q = (vocab - N_SPECIAL) // 4
    return q, N_SPECIAL, N_SPECIAL + q, N_SPECIAL + 2 * q     # size, keys, values, filler start


def max_difficulty(length: int, vocab: int) -> int:
    q = _ranges(vocab)[0]
    return min(length // 4, q) if (vocab - N_SPECIAL - 2 * q) > 0 else 0


def default_difficulty(length: int, vocab: int) -> int:
    return min(max(1, length // 64), max_difficulty(length, vocab))


def make(batch: int, length: int, difficulty: int | None = None, vocab: int = 128, seed: int = 0):
    difficulty, rng, s, ans = start(NAME, batch, length, difficulty, vocab, seed,
                                    default_difficulty=default_difficulty,
                                    max_difficulty=max_difficulty)
    n = difficulty
    q, k0, v0, f0 = _ranges(vocab)
    hay = length - 4 * n                       # filler tokens: T+1 = hay + 2n + 1 + 2n
    for b in range(batch):
        keys = k0 + rng.choice(q, size=n, replace=False)
        vals = v0 + rng.choice(q, size=n, replace=False)
        filler = rng.integers(f0, vocab, size=hay)
        cuts = np.sort(rng.integers(0, hay + 1, size=n))      # needle i goes before filler[cuts[i]]
        parts, prev = [], 0
        for i, c in enumerate(cuts):
            parts += [filler[prev:c], [keys[i], vals[i]]]
            prev = c
        parts.append(filler[prev:])
        body = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        order = rng.permutation(n)
        tail = np.empty(2 * n, dtype=np.int64)
        tail[0::2], tail[1::2] = keys[order], vals[order]
        seq = np.concatenate([body, [SEP], tail])
        s[b] = seq
        ans[b, hay + 2 * n + 2::2] = True
    return finish(s, ans)


def oracle(prefix: np.ndarray) -> int:
    return follower_of_first(prefix, int(prefix[-1]))

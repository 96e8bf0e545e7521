"""Long infill: ``x SEP x' SEP span PAD…`` where x' is x with a span x[a:a+S] replaced by MASK.

The model must write the masked span after the second SEP. It is recoverable only from the
first copy, at the offset where the MASKs sit in the second: a long-range, position-addressed
retrieval of a contiguous span. difficulty = S, the span length.
"""
from __future__ import annotations

import numpy as np

from .common import MASK, N_SPECIAL, SEP, finish, start

NAME = "infill"


def _doc_len(length: int, span: int) -> int:
    return (length + 1 - 2 - span) // 2        # T+1 >= 2L + 2 + S


def max_difficulty(length: int, vocab: int) -> int:
    return max(0, (length - 1) // 3)           # the document must hold the span: L >= S


def default_difficulty(length: int, vocab: int) -> int:
    return min(max(1, length // 8), max_difficulty(length, vocab))


def make(batch: int, length: int, difficulty: int | None = None, vocab: int = 128, seed: int = 0):
    difficulty, rng, s, ans = start(NAME, batch, length, difficulty, vocab, seed,
                                    default_difficulty=default_difficulty,
                                    max_difficulty=max_difficulty, min_length=4)
    S = difficulty
    L = _doc_len(length, S)
    x = rng.integers(N_SPECIAL, vocab, size=(batch, L))
    a = rng.integers(0, L - S + 1, size=batch)
    s[:, :L], s[:, L], s[:, L + 1:2 * L + 1], s[:, 2 * L + 1] = x, SEP, x, SEP
    for b in range(batch):
        s[b, L + 1 + a[b]:L + 1 + a[b] + S] = MASK
        s[b, 2 * L + 2:2 * L + 2 + S] = x[b, a[b]:a[b] + S]
    ans[:, 2 * L + 2:2 * L + 2 + S] = True
    return finish(s, ans)


def oracle(prefix: np.ndarray) -> int:
    seps = np.flatnonzero(prefix == SEP)
    s1, s2 = int(seps[0]), int(seps[1])
    first_mask = s1 + 1 + int(np.flatnonzero(prefix[s1 + 1:s2] == MASK)[0])
    k = prefix.size - 1 - s2                   # how many span tokens are already written
    return int(prefix[first_mask - s1 - 1 + k])

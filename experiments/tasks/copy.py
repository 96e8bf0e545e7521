"""Copy: ``c_1 … c_L SEP c_1 … c_L PAD…``; the answers are the second copy.

difficulty = L, the copied length (at most length // 2). Position-addressed recall: the token
to write at offset i after SEP is the i-th token of the sequence.
"""
from __future__ import annotations

import numpy as np

from .common import N_SPECIAL, SEP, finish, start

NAME = "copy"


def max_difficulty(length: int, vocab: int) -> int:
    return length // 2


def default_difficulty(length: int, vocab: int) -> int:
    return max_difficulty(length, vocab)


def make(batch: int, length: int, difficulty: int | None = None, vocab: int = 128, seed: int = 0):
    difficulty, rng, s, ans = start(NAME, batch, length, difficulty, vocab, seed,
                                    default_difficulty=default_difficulty,
                                    max_difficulty=max_difficulty)
    L = difficulty
    c = rng.integers(N_SPECIAL, vocab, size=(batch, L))
    s[:, :L], s[:, L], s[:, L + 1:2 * L + 1] = c, SEP, c
    ans[:, L + 1:2 * L + 1] = True
    return finish(s, ans)


def oracle(prefix: np.ndarray) -> int:
    """The next token after ``prefix`` (ending at an answer position), read off the prefix."""
    sep = int(np.flatnonzero(prefix == SEP)[0])
    return int(prefix[prefix.size - 1 - sep])

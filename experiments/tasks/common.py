"""What every task generator shares: the special tokens, argument checks, the next-token shift,
the power-law gap sampler, and the exact-match accuracy.

A generator builds a token stream s [B, T+1] and a boolean ``answer`` [B, T+1] marking the
tokens the model must produce. The model sees ``input_ids = s[:, :-1]`` and is scored on
``targets = s[:, 1:]`` where ``loss_mask = answer[:, 1:]``: position t predicts s[t+1], so an
answer is judged at the position just before it, from earlier tokens only.
"""
from __future__ import annotations

import numpy as np
import torch

from glassbrain.checks import check_int

PAD, SEP, MASK, QUERY = 0, 1, 2, 3      # special tokens; content tokens are [N_SPECIAL, vocab)
N_SPECIAL = 4


def check_args(task: str, batch, length, difficulty, vocab, seed, *, max_difficulty,
               min_length: int = 2) -> None:
    """Validate make()'s arguments; ``max_difficulty(length, vocab)`` bounds ``difficulty``."""
    check_int("batch", batch, 1)
    check_int("length", length, min_length)
    check_int("vocab", vocab, N_SPECIAL + 2)
    check_int("seed", seed, 0)
    check_int("difficulty", difficulty, 1)
    top = max_difficulty(length, vocab)
    if top < 1:
        raise ValueError(f"{task}: length {length} with vocab {vocab} leaves no room for even "
                         f"one answer; use a longer length or a larger vocab")
    if difficulty > top:
        raise ValueError(f"difficulty: {task} at length {length} with vocab {vocab} allows at "
                         f"most {top}, got {difficulty}")


def start(task: str, batch, length, difficulty, vocab, seed, *, default_difficulty,
          max_difficulty, min_length: int = 2):
    """The opening every make() shares: the task's default difficulty when none is given, the
    argument checks, the seeded generator, an all-PAD stream [B, T+1] and its answer marks.
    Returns (difficulty, rng, stream, answer)."""
    if difficulty is None:
        difficulty = default_difficulty(length, vocab)
    check_args(task, batch, length, difficulty, vocab, seed, max_difficulty=max_difficulty,
               min_length=min_length)
    stream = np.full((batch, length + 1), PAD, dtype=np.int64)
    return difficulty, np.random.default_rng(seed), stream, np.zeros_like(stream, dtype=bool)


def finish(stream: np.ndarray, answer: np.ndarray):
    """(input_ids, targets, loss_mask) from a stream [B,T+1] and its answer marks [B,T+1]."""
    s = torch.from_numpy(np.ascontiguousarray(stream, dtype=np.int64))
    a = torch.from_numpy(np.ascontiguousarray(answer, dtype=bool))
    return s[:, :-1].contiguous(), s[:, 1:].contiguous(), a[:, 1:].contiguous()


def power_law_slots(rng: np.random.Generator, space: int, n: int, alpha: float = 0.1):
    """``n`` distinct slot indices in [0, space), slot g drawn with probability ∝ (g+1)^(alpha-1):
    most queries come soon after the context, a few far away (the Zoology MQAR gaps)."""
    p = np.arange(1, space + 1, dtype=np.float64) ** (alpha - 1.0)
    return rng.choice(space, size=n, replace=False, p=p / p.sum())


def follower_of_first(prefix: np.ndarray, token: int, *, stop: int | None = None,
                      parity: int | None = None) -> int:
    """The token right after the first occurrence of ``token`` in prefix[:stop] (optionally only at
    even/odd positions): the lookup every associative-recall oracle does."""
    hay = prefix[:stop] if stop is not None else prefix[:-1]
    idx = np.flatnonzero(hay == token)
    if parity is not None:
        idx = idx[idx % 2 == parity]
    if idx.size == 0 or idx[0] + 1 >= prefix.size:
        return PAD                                     # not recoverable: the oracle would fail
    return int(prefix[idx[0] + 1])


def accuracy(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> dict:
    """Exact match of argmax(logits) against targets at the answer positions.

    Returns {"acc": fraction of answer positions right, "seq_acc": fraction of sequences (with at
    least one answer) whose every answer is right, "answers": count, "sequences": count}."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise TypeError(f"logits: expected a float tensor [B,T,V], got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)} "
                        f"{list(getattr(logits, 'shape', []))}")
    if targets.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(f"targets, loss_mask: expected shape {list(logits.shape[:2])}, got "
                         f"{list(targets.shape)} and {list(loss_mask.shape)}")
    if loss_mask.dtype != torch.bool:
        raise TypeError(f"loss_mask: expected a bool tensor, got {loss_mask.dtype}")
    n = int(loss_mask.sum())
    if n == 0:
        raise ValueError("loss_mask: expected at least one answer position, got none")
    right = (logits.argmax(-1) == targets) & loss_mask
    has = loss_mask.any(1)
    all_right = (right | ~loss_mask).all(1) & has
    return {"acc": int(right.sum()) / n, "seq_acc": int(all_right.sum()) / int(has.sum()),
            "answers": n, "sequences": int(has.sum())}

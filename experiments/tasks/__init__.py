"""Synthetic long-range memory tasks, seeded and CPU-cheap.

Every task module has ``make(batch, length, difficulty=None, vocab=128, seed=0)`` returning
(input_ids [B,T] long, targets [B,T] long, loss_mask [B,T] bool): targets are the next tokens
(targets[:, t] == input_ids[:, t+1]) and loss_mask marks the answer positions only. Also
``max_difficulty(length, vocab)``, ``default_difficulty(length, vocab)`` (what the task scales
to at a length) and ``oracle(prefix)``, a reference solver that reads a 1-D prefix ending at an
answer position and returns the answer: it scores 100%, which proves every answer is
recoverable from earlier tokens.

    copy      c_1..c_L SEP c_1..c_L                          difficulty: L
    mqar      k v pairs, then each key at a power-law gap    difficulty: pairs (Zoology MQAR)
    needle    k v hidden in filler, asked after SEP          difficulty: needles
    infill    x SEP x-with-a-MASKed-span SEP span            difficulty: span length
    multihop  a b / b c pairs, SEP, query a → c              difficulty: chains
"""
from __future__ import annotations

import numpy as np
import torch

from . import copy, infill, mqar, multihop, needle
from .common import MASK, N_SPECIAL, PAD, QUERY, SEP, accuracy
from .curriculum import CURRICULA, Curriculum, Phase

TASKS = {m.NAME: m for m in (copy, mqar, needle, infill, multihop)}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task: expected one of {tuple(TASKS)}, got {name!r}")
    return TASKS[name]


def make(task: str, batch: int, length: int, difficulty: int | None = None, vocab: int = 128,
         seed: int = 0):
    """``TASKS[task].make(...)``: (input_ids, targets, loss_mask)."""
    return get_task(task).make(batch, length, difficulty, vocab, seed)


def oracle_predictions(task: str, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """[B,T] long: the task's oracle answer at every loss-mask position (PAD elsewhere), each
    computed from input_ids[b, :t+1] alone."""
    solve = get_task(task).oracle
    ids = input_ids.cpu().numpy()
    out = np.zeros_like(ids)
    for b, t in zip(*np.nonzero(loss_mask.cpu().numpy())):
        out[b, t] = solve(ids[b, :t + 1].copy())
    return torch.from_numpy(out)


__all__ = ["TASKS", "get_task", "make", "accuracy", "oracle_predictions", "Curriculum", "Phase",
           "CURRICULA", "PAD", "SEP", "MASK", "QUERY", "N_SPECIAL"]

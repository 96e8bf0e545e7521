"""A curriculum over context length, task mix and difficulty, driven by accuracy.

Phases grow the context length and the task mix (on a GPU: 512 copy+mqar, 1024 +infill, 2048+
all five; scaled down to 32/64/128 for a CPU). Inside a phase every task climbs a
ladder of difficulty levels, fractions of the task's ``default_difficulty`` at the phase's
length (e.g. MQAR at T=256: 16, 32, 64 pairs). A task steps up a level once its mean accuracy
over the last ``window`` reports is >= ``threshold``, and the window restarts; the curriculum
moves to the next phase once every task of the phase is on its top level and passes again.
Below the threshold (or with a window not yet full) it holds.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Phase:
    length: int
    tasks: tuple
    levels: tuple = (0.25, 0.5, 1.0)         # fractions of default_difficulty(length, vocab)


CURRICULA = {
    # Longer contexts and more tasks, phase by phase, on a GPU.
    "full": (Phase(512, ("copy", "mqar")), Phase(1024, ("copy", "mqar", "infill")),
             Phase(2048, ("copy", "mqar", "infill", "needle", "multihop"))),
    # The same plan, scaled down for a CPU.
    "cpu": (Phase(32, ("copy", "mqar")), Phase(64, ("copy", "mqar", "infill")),
            Phase(128, ("copy", "mqar", "infill", "needle", "multihop"))),
    # Zoology's MQAR setting: T=256, 16 → 32 → 64 pairs.
    "mqar": (Phase(256, ("mqar",)),),
}


class Curriculum:
    def __init__(self, phases, vocab: int, threshold: float = 0.9, window: int = 5):
        from . import get_task                       # the registry lives in the package root
        phases = tuple(phases)
        if not phases:
            raise ValueError("phases: expected at least one Phase, got none")
        for ph in phases:
            if not isinstance(ph, Phase):
                raise TypeError(f"phases: expected Phase objects, got {type(ph).__name__}")
            if not ph.tasks or not ph.levels or any(not 0 < f <= 1 for f in ph.levels):
                raise ValueError(f"phases: each needs tasks and levels in (0, 1], got {ph}")
            for t in ph.tasks:
                get_task(t)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold: expected a float in (0, 1], got {threshold!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an int >= 1, got {window!r}")
        self.phases, self.vocab, self.threshold, self.window = phases, vocab, threshold, window
        self.phase = 0
        self._reset_phase()

    def _reset_phase(self):
        self.level = {t: 0 for t in self.phases[self.phase].tasks}
        self.history = {t: deque(maxlen=self.window) for t in self.phases[self.phase].tasks}

    @property
    def current(self) -> Phase:
        return self.phases[self.phase]

    @property
    def done(self) -> bool:
        """Every phase passed at its top level (training may go on at the last phase)."""
        return getattr(self, "_done", False)

    def difficulty(self, task: str) -> int:
        from . import get_task
        ph, mod = self.current, get_task(task)
        full = mod.default_difficulty(ph.length, self.vocab)
        lv = min(self.level[task], len(ph.levels) - 1)      # a task past its top stays there
        return max(1, min(full, round(ph.levels[lv] * full)))

    def sample(self, rng: np.random.Generator) -> tuple[str, int, int]:
        """(task, length, difficulty) of the next training batch: a task of the phase, uniformly."""
        ph = self.current
        task = ph.tasks[int(rng.integers(len(ph.tasks)))]
        return task, ph.length, self.difficulty(task)

    def update(self, task: str, acc: float) -> str:
        """Report a batch accuracy of ``task``; returns "hold", "level" (that task stepped up) or
        "phase" (the curriculum moved to the next phase)."""
        if task not in self.history:
            raise ValueError(f"task: {task!r} is not in the current phase {self.current.tasks}")
        h = self.history[task]
        h.append(float(acc))
        if len(h) < self.window or sum(h) / len(h) < self.threshold:
            return "hold"
        h.clear()
        top = len(self.current.levels) - 1
        if self.level[task] < top:
            self.level[task] += 1
            return "level"
        self.level[task] = top + 1                   # passed at the top level
        if all(v > top for v in self.level.values()):
            if self.phase + 1 < len(self.phases):
                self.phase += 1
                self._reset_phase()
                return "phase"
            self._done = True
            self.level = {t: top for t in self.level}     # keep training at the top
            return "hold"
        return "hold"

    def position(self) -> dict:
        return {"phase": self.phase, "length": self.current.length, "done": self.done,
                "difficulty": {t: self.difficulty(t) for t in self.level}}

    def state_dict(self) -> dict:
        return {"phase": self.phase, "level": dict(self.level), "done": self.done,
                "history": {t: list(h) for t, h in self.history.items()},
                "phases": [asdict(p) for p in self.phases]}

    def load_state_dict(self, st: dict) -> None:
        if st["phases"] != [asdict(p) for p in self.phases]:
            raise ValueError("state: saved with other phases than this curriculum's")
        self.phase = st["phase"]
        self._reset_phase()
        self.level.update(st["level"])
        for t, h in st["history"].items():
            self.history[t].extend(h)
        self._done = st["done"]

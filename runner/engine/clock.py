"""Training time: wall time less evaluation and checkpoint time (a fused group shares one clock),
and each job's pace between two logging points."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator


class TrainingClock:
    def __init__(self) -> None:
        self.train_s = self.paused_s = 0.0
        self.depth = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.depth += 1
        started = time.time()
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:  # a checkpoint written inside a validation counts once
                self.paused_s += time.time() - started

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        started, paused = time.time(), self.paused_s
        try:
            yield
        finally:
            self.train_s += time.time() - started - (self.paused_s - paused)


class Pace:
    """Units trained per second of training time since the last reading."""

    def __init__(self, clock: TrainingClock, units: int = 0):
        self.clock = clock
        self.restart(units)

    def restart(self, units: int) -> None:
        self.then, self.units, self.paused = time.time(), units, self.clock.paused_s

    def rate(self, units: int) -> float:
        now = time.time()
        busy = now - self.then - (self.clock.paused_s - self.paused)
        rate = (units - self.units) / max(busy, 1e-9)
        self.then, self.units, self.paused = now, units, self.clock.paused_s
        return rate

"""``callbacks.progress``: the terminal display of training (runner/engine/progress.py: a rich bar
on a terminal, plain lines at an interval otherwise; ``mode`` interpolates trainer.progress).
It moves with every optimizer window from host-side counters alone; the loss it shows is the one
read at the last logging point. One display per process: a fused group's jobs share it."""
from __future__ import annotations

import logging
import time
from typing import Any

from runner.callbacks.base import Callback
from runner.engine.progress import PLAIN_EVERY_S, ProgressDisplay

log = logging.getLogger("runner")


class ProgressBar(Callback):
    one_per_process = True

    def __init__(self, mode: str = "auto"):
        self.mode = mode
        self.display: ProgressDisplay | None = None
        self.jobs = 0  # jobs training with this display (a fused group's share one)
        self.logged = float("-inf")  # when run.log last got a progress line

    def on_fit_start(self, trainer: Any) -> None:
        if self.display is None:
            self.display = ProgressDisplay(trainer.total_steps, trainer.family.unit, self.mode,
                                           enabled=trainer.ctx.is_main).__enter__()
        self.jobs += 1

    def on_train_steps(self, trainer: Any, steps: int, row: dict[str, Any] | None) -> None:
        state = trainer.state
        self.display.advance(state.step, state.epoch)
        if row is not None:
            rate = row[f"{trainer.family.unit}_per_s"]
            self.display.update(state.step, state.epoch, row["loss"], rate)
            if time.monotonic() - self.logged >= PLAIN_EVERY_S or state.step >= trainer.total_steps:
                # run.log keeps what a terminal showed, at the plain display's pace
                self.logged = time.monotonic()
                log.info("epoch %d step %d/%d loss %.4f %s %s/s", state.epoch, state.step, trainer.total_steps,
                         row["loss"], f"{rate:,.0f}", trainer.family.unit)

    def on_message(self, trainer: Any, text: str) -> None:
        if self.display is not None:
            self.display.message(text)

    def on_fit_end(self, trainer: Any) -> None:
        self.jobs -= 1  # in a fused group the others may go on: the display closes with the last
        if self.jobs == 0:
            self.close()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.on_fit_end(trainer)  # this job's training is over

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        self.close()  # every job stops

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None

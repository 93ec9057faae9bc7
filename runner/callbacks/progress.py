"""``callbacks.progress``: the terminal display of training (runner/engine/progress.py: a rich bar
on a terminal, plain lines at an interval otherwise; ``mode`` interpolates trainer.progress).
It moves with every optimizer window from host-side counters alone; the loss it shows is the one
read at the last logging point. One display per process: a fused group's jobs share it."""
from __future__ import annotations

from typing import Any

from runner.callbacks.base import Callback
from runner.engine.progress import ProgressDisplay


class ProgressBar(Callback):
    one_per_process = True

    def __init__(self, mode: str = "auto"):
        self.mode = mode
        self.display: ProgressDisplay | None = None
        self.jobs = 0  # jobs training with this display (a fused group's share one)

    def on_fit_start(self, trainer: Any) -> None:
        if self.display is None:
            self.display = ProgressDisplay(trainer.total_steps, trainer.family.unit, self.mode,
                                           enabled=trainer.ctx.is_main).__enter__()
        self.jobs += 1

    def on_train_steps(self, trainer: Any, steps: int, row: dict[str, Any] | None) -> None:
        state = trainer.state
        self.display.advance(state.step, state.epoch)
        if row is not None:
            self.display.update(state.step, state.epoch, row["loss"], row[f"{trainer.family.unit}_per_s"])

    def on_message(self, trainer: Any, text: str) -> None:
        if self.display is not None:
            self.display.message(text)

    def on_fit_end(self, trainer: Any) -> None:
        self.jobs -= 1
        if self.jobs == 0:
            self.close()

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        self.close()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None

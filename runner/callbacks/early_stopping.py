"""``callbacks.early_stopping``: stop when ``monitor`` has not improved by ``min_delta`` for
``patience`` validations (0: never). Its keys interpolate trainer.monitor, trainer.monitor_mode
and trainer.early_stopping.*, so those keep working. Every process sees the same reduced
metrics, and a stop asked for at a validation is agreed there: under DDP every rank stops at
the same step."""
from __future__ import annotations

import math
from typing import Any

from runner.callbacks.base import Callback
from runner.errors import UserError


class EarlyStopping(Callback):
    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 0, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise UserError(f"callbacks.early_stopping.mode={mode!r} is not known; allowed: min, max")
        self.monitor, self.sign, self.patience, self.min_delta = monitor, 1.0 if mode == "min" else -1.0, patience, min_delta
        self.best: float | None = None
        self.stale = 0  # validations since the monitor last improved by min_delta

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if self.best is None or self.sign * value < self.sign * self.best - self.min_delta:
            self.stale = 0
        else:
            self.stale += 1
        if self.best is None or self.sign * value < self.sign * self.best:
            self.best = value
        if 0 < self.patience <= self.stale:
            trainer.say(f"early stopping at step {trainer.state.step}: {self.monitor} has not improved by "
                        f"{self.min_delta} for {self.patience} validations")
            trainer.request_stop("early_stopping")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale = state.get("best"), int(state.get("stale", 0))

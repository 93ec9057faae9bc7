"""``callbacks.checkpoints``: when the run writes checkpoints, and which it keeps.

* ``checkpoints/last.pt``: every ``every_n_steps`` optimizer steps (0: never by steps), at every
  ``every_n_epochs``-th epoch end, at the end of training and on SIGINT / SIGTERM: what
  ``resume=`` continues from (the one before stays as ``last.prev.pt``: a damaged last.pt is
  not the end of the run). ``keep_last: false`` removes both once the run has completed.
* ``checkpoints/best.pt``: the weights of the best validation by ``monitor`` so far (``mode``
  min or max); with ``save_top_k`` > 1 the k best are kept as ``best_step<N>.pt`` and best.pt
  is a second name (a hard link) of the best of them. ``save_top_k: 0``: none.

The config interpolates trainer.* keys (trainer.save_top_k, trainer.ckpt_every_n_steps, ...),
so those keep working; without this callback a run writes no checkpoint and cannot be resumed.
"""
from __future__ import annotations

import math
import os
from typing import Any

from runner.callbacks.base import Callback
from runner.errors import UserError


class Checkpoints(Callback):
    def __init__(self, monitor: str = "val/loss", mode: str = "min", save_top_k: int = 1, every_n_steps: int = 0,
                 every_n_epochs: int = 1, keep_last: bool = True):
        if mode not in ("min", "max"):
            raise UserError(f"callbacks.checkpoints.mode={mode!r} is not known; allowed: min, max")
        if save_top_k < 0 or every_n_steps < 0 or every_n_epochs <= 0:
            raise UserError("callbacks.checkpoints: save_top_k and every_n_steps must be >= 0, every_n_epochs > 0 "
                            f"(got {save_top_k}, {every_n_steps}, {every_n_epochs})")
        self.monitor, self.sign, self.k = monitor, 1.0 if mode == "min" else -1.0, save_top_k
        self.every_n_steps, self.every_n_epochs, self.keep_last = every_n_steps, every_n_epochs, keep_last
        self.best: float | None = None
        self.top: list[list[Any]] = []  # [value, step] of the kept best_step<N>.pt, best first
        self.last_saved = -1  # the step of the last last.pt: written once per step

    def save_last(self, trainer: Any) -> None:
        if self.last_saved != trainer.state.step:
            trainer.save_checkpoint("last")
            self.last_saved = trainer.state.step

    def on_train_steps(self, trainer: Any, steps: int, row: Any) -> None:
        if trainer.passed_multiple(self.every_n_steps, steps):
            self.save_last(trainer)

    def on_epoch_end(self, trainer: Any) -> None:
        if trainer.state.epoch % self.every_n_epochs == 0:
            self.save_last(trainer)

    def on_fit_end(self, trainer: Any) -> None:
        self.save_last(trainer)

    def on_interrupt(self, trainer: Any, signum: int) -> None:
        self.save_last(trainer)

    def on_run_end(self, trainer: Any, status: str) -> None:
        if status == "completed" and not self.keep_last and trainer.run_dir is not None:  # it will not be extended
            for name in ("last.pt", "last.prev.pt"):
                (trainer.run_dir / "checkpoints" / name).unlink(missing_ok=True)

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.monitor)
        if self.k == 0 or value is None or not math.isfinite(value):
            return
        if self.k == 1:
            if self.best is None or self.sign * value < self.sign * self.best:
                self.best = value
                trainer.save_checkpoint("best")
            return
        self.keep_if_top(trainer, value)

    def keep_if_top(self, trainer: Any, value: float) -> None:
        top, step, sign = self.top, trainer.state.step, self.sign
        if len(top) >= self.k and sign * value >= sign * top[-1][0]:
            return
        if self.best is None or sign * value < sign * self.best:
            self.best = value
        trainer.save_checkpoint(f"best_step{step}")
        top.append([value, step])
        top.sort(key=lambda entry: (sign * entry[0], entry[1]))
        folder = trainer.run_dir / "checkpoints" if trainer.run_dir is not None else None
        for _, dropped in top[self.k:]:
            if folder is not None:
                (folder / f"best_step{dropped}.pt").unlink(missing_ok=True)
        del top[self.k:]
        if folder is not None and top[0][1] == step:
            link = folder / ".best.pt.link"
            link.unlink(missing_ok=True)
            os.link(folder / f"best_step{step}.pt", link)
            os.replace(link, folder / "best.pt")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "top": [list(entry) for entry in self.top]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.top = state.get("best"), [list(entry) for entry in state.get("top", [])]

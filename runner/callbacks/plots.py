"""``callbacks.plots``: ``plots/curves.png`` at the end of the run (whatever its status): the
training loss, the learning rate and each validation metric against the step, from metrics.jsonl
(runner/report/plots.py). Family plots (samples, precision-recall curves) are the family's."""
from __future__ import annotations

from typing import Any

from runner.callbacks.base import Callback
from runner.report import plots


class Plots(Callback):
    def __init__(self, filename: str = "plots/curves.png"):
        self.filename = filename

    def on_run_end(self, trainer: Any, status: str) -> None:
        if trainer.run_dir is not None:
            plots.draw_safely(self.filename, plots.plot_curves, trainer.run_dir / "metrics.jsonl",
                              trainer.run_dir / self.filename, title=trainer.results.title)

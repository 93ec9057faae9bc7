"""Progress: a rich bar on a terminal, plain lines at a fixed interval otherwise.

The bar moves with every optimizer step (``advance``: host-side counters only, never a device
read), redrawn at most ten times a second, with steps/s and the ETA from wall time; the loss
shown is the one of the last logging point (``update``), the only place the loss is read.
"""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

REDRAW_S = 0.1  # the bar at most this often: a redraw costs more than a captured IWAE step
PLAIN_EVERY_S = 30.0  # a plain line this often when the output is not a terminal


class ProgressDisplay:
    def __init__(self, total_steps: int, unit: str, mode: str = "auto", enabled: bool = True,
                 plain_every_s: float = PLAIN_EVERY_S):
        self.console = Console(stderr=False)
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self.total, self.unit, self.plain_every_s = total_steps, unit, plain_every_s
        self.loss, self.rate = "-", "-"
        self.bar: Progress | None = None
        if self.mode == "rich":
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
                auto_refresh=False,
            )
            self.task = self.bar.add_task("train", total=total_steps, loss="-", rate="-")

    def __enter__(self) -> "ProgressDisplay":
        self.started, self.last_drawn = time.monotonic(), float("-inf")  # the first step draws at once
        self.first_step: int | None = None
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, step: int, epoch: int, force: bool = False) -> None:
        """After every optimizer step; draws when the last drawing is old enough."""
        if self.mode == "none":
            return
        now = time.monotonic()
        if self.first_step is None:
            self.first_step, self.started = step - 1, now
        interval = REDRAW_S if self.mode == "rich" else self.plain_every_s
        if not force and step < self.total and now - self.last_drawn < interval:
            return
        self.last_drawn = now
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"epoch {epoch}", loss=self.loss, rate=self.rate)
            self.bar.refresh()
        else:
            done = max(step - self.first_step, 1)
            elapsed = max(now - self.started, 1e-9)
            pace = (f"{done / elapsed:,.1f} steps/s elapsed {elapsed:.0f}s eta {elapsed / done * (self.total - step):.0f}s"
                    if elapsed > 0.5 else "started")
            print(f"epoch {epoch} step {step}/{self.total} loss {self.loss} {self.rate} {pace}", flush=True)

    def update(self, step: int, epoch: int, loss: float, rate: float) -> None:
        """At a logging point: the loss and the rate to show from now on."""
        self.loss, self.rate = f"{loss:.4f}", f"{rate:,.0f} {self.unit}/s"
        if self.bar is not None:
            self.advance(step, epoch, force=True)

    def message(self, text: str) -> None:
        if self.mode == "rich" and self.bar is not None:
            self.bar.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def metrics_table(metrics: dict[str, float]) -> Table:
    """The headline metrics (per-label ones live in per_class.csv)."""
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        if key.count("/") > 1:
            continue
        value = metrics[key]
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table

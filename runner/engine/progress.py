"""Progress: a rich bar (loss, samples/s, ETA) on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class ProgressDisplay:
    def __init__(self, total_steps: int, unit: str, mode: str = "auto", enabled: bool = True):
        self.console = Console(stderr=False)
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self.total, self.unit = total_steps, unit
        self.started = time.time()
        self.bar: Progress | None = None
        if self.mode == "rich":
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.bar.add_task("train", total=total_steps, loss="-", rate="-")

    def __enter__(self) -> "ProgressDisplay":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, step: int, epoch: int, loss: float, rate: float) -> None:
        if self.mode == "rich" and self.bar is not None:
            self.bar.update(self.task, completed=step, description=f"epoch {epoch}", loss=f"{loss:.4f}",
                            rate=f"{rate:,.0f} {self.unit}/s")
        elif self.mode == "plain":
            elapsed = time.time() - self.started
            eta = elapsed / max(step, 1) * (self.total - step)
            print(f"epoch {epoch} step {step}/{self.total} loss {loss:.4f} {rate:,.0f} {self.unit}/s "
                  f"elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)

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

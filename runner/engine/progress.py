"""Progress: one line on a terminal, redrawn in place, plain lines at a fixed interval otherwise.

The line moves with every optimizer step (``advance``: host-side counters only, never a device
read), redrawn at most ten times a second: the epoch, a bar, the steps done of all, the loss
and the rate of the last logging point (``update``, the only place the loss is read; "—" until
the first), the time since training started and the ETA from the step rate. It is laid out for
the terminal's width: where the fields do not fit, the bar shrinks and then whole fields go,
least useful first, so a number is never cut. Two columns stay free, for the ``^C`` the terminal
echoes after the cursor: a line that filled the width would wrap there, and the redraw would
leave the old line standing above the new one.
"""
from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.table import Table
from rich.text import Text

REDRAW_S = 0.1  # the bar at most this often: a redraw costs more than a captured IWAE step
PLAIN_EVERY_S = 30.0  # a plain line this often when the output is not a terminal
NONE_YET = "—"  # a reading not taken yet (the loss before the first logging point)
ECHO_COLUMNS = 2  # left free at the line's end: the terminal's echo of ^C
BAR_MIN, BAR_MAX = 10, 40  # a bar narrower than this says nothing; wider, it only takes room
# What goes first where the line does not fit (the step count never goes).
DROP_ORDER = ("rate", "elapsed", "epoch", "bar", "eta", "loss")


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressDisplay:
    def __init__(self, total_steps: int, unit: str, mode: str = "auto", enabled: bool = True,
                 plain_every_s: float = PLAIN_EVERY_S):
        self.console = Console(stderr=False)
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self.total, self.unit, self.plain_every_s = total_steps, unit, plain_every_s
        self.loss: str = NONE_YET
        self.rate: str = NONE_YET
        self.step, self.epoch = 0, 0
        self.live: Live | None = None
        self.opened = self.started = time.monotonic()
        self.first_step: int | None = None

    def __enter__(self) -> "ProgressDisplay":
        self.opened = self.started = time.monotonic()  # elapsed counts from here: the start of training
        self.last_drawn = float("-inf")  # the first step draws at once
        self.first_step: int | None = None
        if self.mode == "rich":
            self.live = Live(FittedLine(self), console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, step: int, epoch: int, force: bool = False) -> None:
        """After every optimizer step; draws when the last drawing is old enough."""
        if self.mode == "none":
            return
        now = time.monotonic()
        if self.first_step is None:  # the pace counts from the first step (a resumed run starts late)
            self.first_step, self.started = step - 1, now
        self.step, self.epoch = step, epoch
        interval = REDRAW_S if self.mode == "rich" else self.plain_every_s
        if not force and step < self.total and now - self.last_drawn < interval:
            return
        self.last_drawn = now
        if self.live is not None:
            self.live.refresh()
        elif self.mode == "plain":
            print(" ".join(text for _, text in self.fields(now, labelled=True)), flush=True)

    def update(self, step: int, epoch: int, loss: float, rate: float) -> None:
        """At a logging point: the loss and the rate to show from now on."""
        self.loss, self.rate = f"{loss:.4f}", f"{rate:,.0f}"
        if self.live is not None:
            self.advance(step, epoch, force=True)

    def fields(self, now: float | None = None, labelled: bool = False) -> list[tuple[str, str]]:
        """(name, text) of each field but the bar, in the order shown; ``labelled``: each number
        named (the plain lines, which have no bar to say what the count is)."""
        now = time.monotonic() if now is None else now
        done = self.step - (self.first_step if self.first_step is not None else self.step)
        pace = now - self.started
        eta = clock(pace / done * (self.total - self.step)) if done > 0 and pace > 0 else NONE_YET
        label = (lambda name: f"{name} ") if labelled else (lambda name: "")
        return [("epoch", f"epoch {self.epoch}"), ("count", f"{label('step')}{self.step}/{self.total}"),
                ("loss", f"loss {self.loss}"), ("rate", f"{self.rate} {self.unit}/s"),
                ("elapsed", f"{label('elapsed')}{clock(now - self.opened)}"), ("eta", f"ETA {eta}")]

    def message(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()  # draws the last state once, then leaves it on its own line
            self.live = None


class FittedLine:
    """The progress line laid out for the width rich renders it at (see the module docstring)."""

    STYLES = {"epoch": "bold", "count": "green", "elapsed": "yellow", "eta": "cyan"}

    def __init__(self, display: ProgressDisplay):
        self.display = display

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.line(options.max_width - ECHO_COLUMNS)

    def line(self, width: int) -> Text:
        fields, with_bar = self.display.fields(), True
        for name in DROP_ORDER:
            if self.length(fields) + (1 + BAR_MIN if with_bar else 0) <= width:
                break
            with_bar = with_bar and name != "bar"
            fields = [f for f in fields if f[0] != name]
        bar = min(BAR_MAX, width - self.length(fields) - 1) if with_bar else 0
        parts: list[Any] = []
        for name, text in fields:
            if name == "count" and bar >= BAR_MIN:  # the bar sits before the count, as rich draws it
                parts.extend([self.bar(bar), " "])
            parts.extend([(text, self.STYLES.get(name, "")), " "])
        return Text.assemble(*parts[:-1], no_wrap=True, overflow="ignore")

    @staticmethod
    def length(fields: list[tuple[str, str]]) -> int:
        return sum(len(text) for _, text in fields) + len(fields) - 1

    def bar(self, width: int) -> Text:
        d = self.display
        filled = round(width * min(d.step / d.total, 1.0)) if d.total else width
        return Text.assemble(("━" * filled, "bar.complete"), ("━" * (width - filled), "bar.back"))


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


def predictions_line(predictions: dict[str, Any]) -> str:
    """The end of a mode=predict run: the file, its rows and, where the data had labels, their score."""
    scores = ", ".join(f"{name} {value:.4f}" for name, value in (predictions.get("metric") or {}).items())
    return (f"predictions: {predictions['path']} ({predictions['rows']:,} rows"
            + (f"; {scores} over their labels" if scores else "") + ")")

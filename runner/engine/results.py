"""The run folder's result files: metrics.jsonl (one row per logged evaluation), summary.json,
the TensorBoard event file (``logger=tensorboard``) and ``plots/curves.png``."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from runner import plots
from runner.files import append_line, atomic_write_json, atomic_write_text

STATUSES = ("running", "completed", "failed", "interrupted")
ROW_KEYS = ("epoch", "step", "split")  # where a row sits, not what it measured
log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """JSON-safe numbers: NaN and inf become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunResults:
    """Writes a run's result files. Only the main process writes; others hold a disabled copy."""

    def __init__(self, run_dir: Path | None, logger: str = "csv"):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.logger = logger
        self.writer: Any = None  # TensorBoard's SummaryWriter, opened at the first row
        self.started = time.time()
        self.held = False
        self.summary: dict[str, Any] = {
            "status": "running",
            "metrics": {},
            "eval_samples": {},
            "steps": 0,
            "samples_seen": 0,
            "wall_time_s": 0.0,
            "throughput": None,
            "device": None,
            "error": None,
        }

    @property
    def enabled(self) -> bool:
        return self.run_dir is not None

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            append_line(self.run_dir / "metrics.jsonl", json.dumps({k: _plain(v) for k, v in row.items()}))
            if self.logger == "tensorboard":
                self.log_tensorboard(row)

    def log_tensorboard(self, row: dict[str, Any]) -> None:
        """Every number of the row as a scalar at the row's step; training metrics get the
        ``train/`` prefix that evaluation metrics already carry (``val/loss``)."""
        step = row.get("step") or 0  # evaluation-only rows have no step
        writer = self.tensorboard_writer(step)
        if writer is None:
            return
        prefix = "train/" if row.get("split") == "train" else ""
        for key, value in row.items():
            if key not in ROW_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{prefix}{key}", value, global_step=step)

    def tensorboard_writer(self, first_step: int) -> Any:
        """The SummaryWriter of ``<run_dir>/tensorboard/``; without tensorboard, say so once and
        fall back to metrics.jsonl alone."""
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("logger=tensorboard but tensorboard is not installed: logging to metrics.jsonl "
                            "only (pip install tensorboard)")
                self.logger = "csv"
                return None
            log_dir = self.run_dir / "tensorboard"
            # A resumed run logs again the steps after its last checkpoint: hide the interrupted
            # run's events from this step on, so TensorBoard shows each step once.
            purge_step = first_step if log_dir.is_dir() else None
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        return self.writer

    def hold(self) -> None:
        """A resumed run: leave summary.json and metrics.jsonl as the interrupted run left them
        until ``resumed`` says the run really continues (a resume that fails to start touches
        nothing)."""
        self.held = True

    def resumed(self, step: int) -> None:
        """The run continues after optimizer step ``step``: forget what the interrupted run logged
        after it (it is logged again) and any file a kill left half-written."""
        self.held = False
        if not self.enabled:
            return
        for torn in self.run_dir.rglob(".*.tmp"):
            torn.unlink(missing_ok=True)
        rows_file = self.run_dir / "metrics.jsonl"
        if rows_file.is_file():
            kept = [line for line in rows_file.read_text().splitlines() if line.strip() and _before(line, step)]
            atomic_write_text(rows_file, "".join(line + "\n" for line in kept))

    def write_summary(self, **fields: Any) -> None:
        if self.held:
            return
        self.summary.update(fields)
        self.summary["wall_time_s"] = round(time.time() - self.started, 3)
        self.summary["metrics"] = {k: _plain(v) for k, v in self.summary["metrics"].items()}
        if self.enabled:
            atomic_write_json(self.run_dir / "summary.json", self.summary)

    def finish(self, title: str | None = None) -> None:
        """End of the run (any status): close loggers and draw the run's plots."""
        if self.held:  # a resume that did not start: the folder stays as it was
            return
        if self.writer is not None:
            self.writer.close()  # flushes the event file
            self.writer = None
        if self.enabled:
            plots.draw_safely("plots/curves.png", plots.plot_curves, self.run_dir / "metrics.jsonl",
                              self.run_dir / "plots" / "curves.png", title=title)


def _before(line: str, step: int) -> bool:
    """Whether a metrics.jsonl row was logged at or before ``step`` of training (test rows are
    written again when the resumed run tests)."""
    row = json.loads(line)
    return row.get("split") != "test" and (row.get("step") or 0) <= step


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())

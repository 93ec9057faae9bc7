"""The run folder's result files: metrics.jsonl (one row per logged evaluation) and summary.json;
each row and the end of the run also go to the run's loggers (``logger=[csv,tensorboard,...]``, runner/loggers/)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from runner.runs.files import append_line, atomic_write_json, atomic_write_text, json_text, overwrite_in_place, read_rows
from runner.loggers import Loggers, RunInfo

STATUSES = ("running", "completed", "failed", "interrupted")
log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """JSON-safe numbers: NaN and inf become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunResults:
    """Writes a run's result files. Only the main process writes; others hold a disabled copy."""

    def __init__(self, run_dir: Path | None, run: RunInfo | None = None, logger: Any = None):
        """``run`` describes the run to the loggers that ``logger`` (the config node) selects;
        they start when summary.json first says ``running``."""
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run = run if self.enabled else None
        self.loggers = Loggers(logger, self.run)
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

    @property
    def title(self) -> str | None:
        return self.run.title if self.run is not None else None

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            self.loggers.start()  # before the row is kept: a logger starting reads metrics.jsonl
            append_line(self.run_dir / "metrics.jsonl", json.dumps({k: _plain(v) for k, v in row.items()}))
            self.loggers.log_row(row)

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
            rows = read_rows(rows_file)
            kept = [row for row in rows if row.get("split") != "test" and (row.get("step") or 0) <= step]
            atomic_write_text(rows_file, "".join(json.dumps(row) + "\n" for row in kept))

    def write_summary(self, **fields: Any) -> None:
        if self.held:
            return
        self.summary.update(fields)
        self.summary["wall_time_s"] = round(time.time() - self.started, 3)
        self.summary["metrics"] = {k: _plain(v) for k, v in self.summary["metrics"].items()}
        if self.enabled:
            try:
                atomic_write_json(self.run_dir / "summary.json", self.summary)
            except OSError:
                if self.summary["status"] == "running":
                    raise
                # The end of the run on a full disk: the file in place (its old blocks freed first)
                # rather than a summary that goes on saying running. Still failing: the caller says so.
                overwrite_in_place(self.run_dir / "summary.json", json_text(self.summary))
            if self.summary["status"] == "running":  # the run starts: so do its loggers
                self.loggers.start()

    def finish(self) -> None:
        """End of the run (any status), after the callbacks' end (the plots are drawn): the final
        summary and status go to the loggers, which close."""
        if self.held:  # a resume that did not start: the folder stays as it was
            return
        self.loggers.finish(self.summary, self.summary["status"])


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())

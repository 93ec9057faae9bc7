"""The run folder's result files: metrics.jsonl (one row per logged evaluation) and summary.json."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from runner.engine.files import append_line, atomic_write_json

STATUSES = ("running", "completed", "failed", "interrupted")


def _plain(value: Any) -> Any:
    """JSON-safe numbers: NaN and inf become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunResults:
    """Writes a run's result files. Only the main process writes; others hold a disabled copy."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.started = time.time()
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

    def write_summary(self, **fields: Any) -> None:
        self.summary.update(fields)
        self.summary["wall_time_s"] = round(time.time() - self.started, 3)
        self.summary["metrics"] = {k: _plain(v) for k, v in self.summary["metrics"].items()}
        if self.enabled:
            atomic_write_json(self.run_dir / "summary.json", self.summary)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())

"""``logger=csv``: ``<run>/metrics.csv``, one row per log point (training windows and evaluations),
one column per metric, for pandas or a spreadsheet. The columns are metrics.jsonl's keys as they
are (``loss``, ``lr`` of the training rows; ``val/loss``, ``test/mAP``, ...): the ``split`` column
says which rows are training ones, so the file reads like the JSON lines beside it. (Trackers
name training metrics ``train/loss``: runner/loggers/base.py ``named``.)

Rows are appended while the columns stay the same; a new metric (the first validation, the test)
rewrites the file atomically with the new column, so a kill never leaves a torn file.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from runner.runs.files import append_line, atomic_write_text
from runner.loggers.base import POSITION, Logger, RunInfo


class CSVLogger(Logger):
    def __init__(self, run: RunInfo, filename: str = "metrics.csv"):
        super().__init__(run)
        self.path = Path(run.run_dir) / filename
        self.columns: list[str] = list(POSITION)
        self.rows: list[dict[str, Any]] = []

    def start(self) -> None:
        # A resumed run: start from the rows the engine kept in metrics.jsonl (those up to the
        # checkpoint it continues from), so each step appears once.
        kept = self.run.run_dir / "metrics.jsonl"
        if kept.is_file():
            for line in kept.read_text().splitlines():
                if line.strip():
                    self.add(json.loads(line))
        self.rewrite()

    def log_row(self, row: dict[str, Any]) -> None:
        if self.add(row):
            self.rewrite()
        else:
            append_line(self.path, self.line(self.rows[-1]))

    def add(self, row: dict[str, Any]) -> bool:
        """Keep the row; True when it brought a new column."""
        values = {key: row.get(key) for key in POSITION} | {k: v for k, v in row.items() if k not in POSITION}
        new = [key for key in values if key not in self.columns]
        self.columns += new
        self.rows.append(values)
        return bool(new)

    def line(self, values: dict[str, Any]) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(["" if values.get(c) is None else values[c] for c in self.columns])
        return out.getvalue()

    def rewrite(self) -> None:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(self.columns)
        atomic_write_text(self.path, out.getvalue() + "".join(self.line(values) for values in self.rows))

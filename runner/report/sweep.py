"""Sweeps: one row per job (its overrides and final metrics), as ``summary.csv`` at the sweep root."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.runs.files import atomic_write_text, folder_in_use

if TYPE_CHECKING:  # pandas is imported where a table is made: not on every start (0.7 s)
    import pandas as pd


def job_overrides(job_dir: Path) -> dict[str, str]:
    """The command-line overrides one job ran with (``key=value``, ``+``/``~`` dropped)."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return {}
    pairs = (str(item).partition("=") for item in OmegaConf.load(overrides_file))
    return {key.lstrip("+~"): value for key, _, value in pairs}


def job_row(job_dir: Path, overrides: dict[str, str]) -> dict[str, Any]:
    """The job's overrides + status + flat final metrics of its folder."""
    row: dict[str, Any] = {"job": job_dir.name, **overrides}
    summary_file = job_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        row["status"] = summary.get("status")
        if row["status"] == "running" and not folder_in_use(job_dir):
            row["status"] = "stale"  # says running, but no process holds the folder: it died unrecorded
        row["error"] = summary.get("error")
        row["steps"] = summary.get("steps")
        row["wall_time_s"] = summary.get("wall_time_s")
        row.update(summary.get("metrics", {}))
    else:
        row["status"] = "not started"  # or killed before it wrote anything; resume=<sweep folder> runs it
        row["error"] = "no summary.json: the job did not start, or was killed before it wrote one"
    return row


def job_folders(sweep_dir: Path) -> list[Path]:
    folders = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(folders, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job; ``attrs["override_keys"]``: the columns that are overrides (the job's own
    columns, status or wall_time_s, have no "/" in their names either, so the names alone do not tell)."""
    folders = job_folders(sweep_dir)
    overrides = [job_overrides(p) for p in folders]
    import pandas as pd

    table = pd.DataFrame([job_row(p, o) for p, o in zip(folders, overrides)])
    table.attrs["override_keys"] = list(dict.fromkeys(key for o in overrides for key in o))
    return table


def write_summary_csv(sweep_dir: Path) -> pd.DataFrame:
    table = collect(sweep_dir)
    atomic_write_text(Path(sweep_dir) / "summary.csv", table.to_csv(index=False))
    return table


class SummaryCSVCallback(Callback):
    """Rewrites summary.csv after each job (so a killed sweep keeps its finished rows) and at the
    end. Jobs run by a parallel launcher call on_job_end in their own processes; the file is
    rebuilt from the job folders each time and replaced atomically, so it is never torn."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir if config.hydra.mode.name == "MULTIRUN" else None
        if sweep_dir and Path(sweep_dir).is_dir():
            write_summary_csv(Path(sweep_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary_csv(Path(config.hydra.sweep.dir))

"""``python -m runner.report <sweep or run folder>``: final metrics as a table.

For a sweep: one row per combination of the swept overrides (``trainer.seed`` excluded), each
metric as mean ± std over the seeds; written to report.csv and report.md beside summary.csv, and
as one bar chart per metric to plots/report_<metric>.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from runner import plots
from runner.files import atomic_write_text
from runner.sweep import write_summary_csv

SEED_KEY = "trainer.seed"
NON_METRICS = {"job", "status", "error", "steps", "wall_time_s"}


def metric_columns(table: pd.DataFrame, wanted: list[str] | None) -> list[str]:
    if wanted:
        missing = [m for m in wanted if m not in table.columns]
        if missing:
            known = sorted(c for c in table.columns if "/" in c)
            raise SystemExit(f"error: no metric {', '.join(missing)} in this folder; known: {', '.join(known)}")
        return wanted
    return [c for c in table.columns if c.count("/") == 1 and pd.api.types.is_numeric_dtype(table[c])]


def swept_keys(table: pd.DataFrame, override_keys: list[str]) -> list[str]:
    return [k for k in override_keys if k != SEED_KEY and table[k].astype(str).nunique() > 1]


def aggregate(table: pd.DataFrame, group_by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, std (ddof=1) and seed count of each metric per group, over completed jobs."""
    done = table[table["status"] == "completed"]
    if not group_by:
        done = done.assign(all="all")
        group_by = ["all"]
    grouped = done.groupby(group_by, dropna=False, sort=False)[metrics]
    out = grouped.agg(["mean", "std"])
    out.columns = [f"{m} {stat}" for m, stat in out.columns]
    out["seeds"] = grouped.size()
    return out.reset_index()


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def formatted(summary: pd.DataFrame, group_by: list[str], metrics: list[str]) -> pd.DataFrame:
    shown = summary[[*group_by, "seeds"]].copy()
    for m in metrics:
        shown[m] = [_cell(a, b) for a, b in zip(summary[f"{m} mean"], summary[f"{m} std"])]
    return shown


def render(shown: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for column in shown.columns:
        table.add_column(str(column), justify="right" if column not in ("all",) else "left")
    for row in shown.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    return table


def report_sweep(folder: Path, metrics: list[str] | None, sort: str | None, group_by: list[str] | None,
                 console: Console) -> pd.DataFrame:
    table = write_summary_csv(folder)
    override_keys = [c for c in table.columns if c not in NON_METRICS and "/" not in c]
    metrics = metric_columns(table, metrics)
    keys = group_by if group_by is not None else swept_keys(table, override_keys)
    summary = aggregate(table, keys, metrics)
    if sort:
        column = f"{sort} mean"
        if column not in summary.columns:
            raise SystemExit(f"error: --sort {sort} is not a reported metric; choose one of: {', '.join(metrics)}")
        summary = summary.sort_values(column)
    shown = formatted(summary, keys or ["all"], metrics)
    atomic_write_text(folder / "report.csv", summary.to_csv(index=False))
    atomic_write_text(folder / "report.md", shown.to_markdown(index=False) + "\n")
    charts = plots.draw_safely("report plots", plots.plot_report_bars, summary, keys, metrics, folder / "plots") or []
    failed = table[table["status"] != "completed"]
    console.print(render(shown, f"{folder.name}: mean ± std over {SEED_KEY}"))
    if len(failed):
        console.print(f"[yellow]{len(failed)} job(s) did not complete: {', '.join(failed['job'].astype(str))}")
    written = [folder / "report.csv", folder / "report.md"] + ([folder / "plots" / "report_*.png"] if charts else [])
    console.print(f"written: {', '.join(map(str, written))}", soft_wrap=True)
    return summary


def report_run(folder: Path, console: Console) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    table = Table(title=f"{folder.name} ({summary['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(summary["metrics"].items()):
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if summary.get("error"):
        console.print(f"[red]error: {summary['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder (outputs/multirun/...) or a run folder")
    parser.add_argument("--metric", action="append", help="metric to show (repeatable); default: all")
    parser.add_argument("--sort", help="sort rows by this metric's mean")
    parser.add_argument("--group-by", help="comma-separated override keys to group by; default: the swept ones")
    args = parser.parse_args(argv)
    console = Console()
    folder = args.folder
    if not folder.is_dir():
        console.print(f"[red]error:[/] {folder} is not a folder")
        return 2
    group_by = [k for k in args.group_by.split(",") if k] if args.group_by is not None else None
    try:
        if (folder / "summary.json").is_file() and not any((folder / d / ".hydra").is_dir() for d in ("0", "1")):
            report_run(folder, console)
        else:
            report_sweep(folder, args.metric, args.sort, group_by, console)
    except SystemExit as e:
        console.print(str(e), highlight=False)
        return 2
    except KeyError as e:
        console.print(f"[red]error:[/] --group-by key {e} is not an override of this sweep")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

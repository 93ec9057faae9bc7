"""``python -m runner.report <sweep or run folder>``: final metrics as a table.

For a sweep: one row per combination of the swept overrides (``trainer.seed`` excluded), each
metric as mean ± std over the seeds, best first. The terminal shows the monitored metric
(``trainer.monitor``) and the test metrics that fit its width (``--all``: every metric);
report.csv and report.md beside summary.csv hold every metric, and plots/report_<metric>.png
one bar chart each. A search (hydra/sweeper=search) also shows its best trial, from best.json.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from runner.report import plots
from runner.runs.files import atomic_write_text
from runner.report.sweep import job_folders, write_summary_csv

SEED_KEY = "trainer.seed"
# The direction of a metric that is not the runs' monitor, by the words of its name.
HIGHER_IS_BETTER = {"map", "ap", "auroc", "auc", "accuracy", "acc", "f1", "precision", "recall", "bound", "elbo",
                    "iou", "dice", "r2"}
LOWER_IS_BETTER = {"loss", "nll", "bpc", "ppl", "perplexity", "error", "err", "ece", "mse", "mae", "rmse", "kl"}


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


def monitor_of(folder: Path) -> tuple[str | None, str | None]:
    """(trainer.monitor, trainer.monitor_mode) that most of the sweep's jobs ran with."""
    found = Counter()
    for job in job_folders(folder):
        saved = job / ".hydra" / "config.yaml"
        if saved.is_file():
            cfg = OmegaConf.load(saved)
            found[tuple(OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
                        for key in ("trainer.monitor", "trainer.monitor_mode"))] += 1
    return found.most_common(1)[0][0] if found else (None, None)


def direction(metric: str, monitor: str | None, monitor_mode: str | None) -> str | None:
    """"max", "min" or None (unknown): the runs' monitor_mode for the monitor, else the words
    of the name (``test/nll_k5000``: nll, lower is better; ``val/macro_f1``: f1, higher)."""
    if metric == monitor and str(monitor_mode) in ("max", "min"):
        return str(monitor_mode)
    for word in re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower()):
        if word in LOWER_IS_BETTER:
            return "min"
        if word in HIGHER_IS_BETTER:
            return "max"
    return None


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
        # fold, not "…": a cell too wide for the terminal wraps and keeps every digit
        table.add_column(str(column), justify="right" if column not in ("all",) else "left", overflow="fold")
    for row in shown.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    return table


def fits(console: Console, shown: pd.DataFrame) -> bool:
    """Whether the table's natural width (measured without the terminal's limit) fits it."""
    unlimited = console.options.update_width(10_000)
    return console.measure(render(shown, ""), options=unlimited).maximum <= console.width


def terminal_metrics(console: Console, summary: pd.DataFrame, group_by: list[str], metrics: list[str],
                     monitor: str | None) -> list[str]:
    """The monitored metric, then the test metrics (the monitor's own first: val/mAP -> test/mAP)
    as long as the table fits the terminal's width."""
    counterpart = f"test/{monitor.split('/', 1)[-1]}" if monitor else None
    tests = sorted((m for m in metrics if m.startswith("test/")), key=lambda m: m != counterpart)  # stable
    chosen = [monitor] if monitor in metrics else []
    for metric in tests:
        if not chosen or fits(console, formatted(summary, group_by, [*chosen, metric])):
            chosen.append(metric)
    return chosen or metrics[:1]


def sort_best_first(summary: pd.DataFrame, metric: str, monitor: str | None, monitor_mode: str | None,
                    console: Console) -> pd.DataFrame:
    best = direction(metric, monitor, monitor_mode)
    if best is None:
        console.print(f"[yellow]which way {metric} is better is not known: sorted ascending", highlight=False)
    return summary.sort_values(f"{metric} mean", ascending=best != "max", na_position="last", kind="stable")


def report_sweep(folder: Path, metrics: list[str] | None, sort: str | None, group_by: list[str] | None,
                 console: Console, every: bool = False) -> pd.DataFrame:
    table = write_summary_csv(folder)
    override_keys = table.attrs["override_keys"]
    chosen = metric_columns(table, metrics)  # --metric, else every metric
    keys = group_by if group_by is not None else swept_keys(table, override_keys)
    unknown = [k for k in keys if k not in override_keys]
    if unknown:
        raise SystemExit(f"error: --group-by key {unknown[0]!r} is not an override of this sweep; its overrides: "
                         f"{', '.join(override_keys) or '(none)'}")
    summary = aggregate(table, keys, chosen)
    monitor, monitor_mode = monitor_of(folder)
    if monitor is None and "val/loss" in chosen:
        monitor, monitor_mode = "val/loss", "min"  # jobs without a saved config: the trainer's default
    sort = sort or (monitor if monitor in chosen else None)
    if sort:
        if f"{sort} mean" not in summary.columns:
            raise SystemExit(f"error: --sort {sort} is not a reported metric; choose one of: {', '.join(chosen)}")
        summary = sort_best_first(summary, sort, monitor, monitor_mode, console)
    group_columns = keys or ["all"]
    atomic_write_text(folder / "report.csv", summary.to_csv(index=False))
    atomic_write_text(folder / "report.md", formatted(summary, group_columns, chosen).to_markdown(index=False) + "\n")
    charts = plots.draw_safely("report plots", plots.plot_report_bars, summary, keys, chosen, folder / "plots") or []
    shown = chosen if metrics or every else terminal_metrics(console, summary, group_columns, chosen, monitor)
    order = f", best {sort} first" if sort else ""
    console.print(render(formatted(summary, group_columns, shown), f"{folder.name}: mean ± std over {SEED_KEY}{order}"))
    if len(shown) < len(chosen):
        console.print(f"{len(chosen) - len(shown)} more metric(s) in report.csv / report.md (--all shows them here)")
    failed = table[table["status"] != "completed"]
    if len(failed):
        console.print(f"[yellow]{len(failed)} job(s) did not complete: {', '.join(failed['job'].astype(str))}")
    show_best(folder, console)
    written = [folder / "report.csv", folder / "report.md"] + ([folder / "plots" / "report_*.png"] if charts else [])
    console.print(f"written: {', '.join(map(str, written))}", soft_wrap=True)
    return summary


def show_best(folder: Path, console: Console) -> dict | None:
    """A search's best trial, from the best.json its sweeper wrote (hydra/sweeper=search); the
    study may hold trials of earlier commands, run in other folders."""
    path = folder / "best.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        console.print(f"[yellow]{path} is not JSON: no best trial shown", highlight=False)
        return None
    counts = ", ".join(f"{n} {state}" for state, n in sorted(record.get("trials", {}).items()))
    console.print(f"study {record.get('study_name')} ({record.get('storage') or 'in memory'}; {counts}), "
                  f"{record.get('direction')} {record.get('metric')}", highlight=False, soft_wrap=True)
    best = record.get("best")
    if not best:
        console.print("[yellow]no trial of the study completed", highlight=False)
        return record
    console.print(f"best trial {best['trial']}: {best['metric']}={best['value']:.6g} with "
                  f"{' '.join(best.get('params_overrides') or [])} (run folder {best.get('run_dir')})",
                  highlight=False, soft_wrap=True)
    console.print(f"again, as one run: {best.get('command')}", highlight=False, soft_wrap=True)
    return record


def report_run(folder: Path, console: Console) -> None:
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except ValueError as e:
        raise SystemExit(f"error: {folder / 'summary.json'} is not JSON: {e}") from None
    table = Table(title=f"{folder.name} ({summary.get('status')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(summary.get("metrics", {}).items()):
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if summary.get("error"):
        console.print(f"[red]error: {summary['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder (outputs/multirun/...) or a run folder")
    parser.add_argument("--metric", action="append",
                        help="metric to report (repeatable); default: the monitored one and the test metrics that "
                             "fit the terminal (report.csv and report.md get every metric)")
    parser.add_argument("--all", action="store_true", help="show every metric in the terminal too")
    parser.add_argument("--sort", help="sort rows best-first by this metric's mean; default: trainer.monitor")
    parser.add_argument("--group-by", help="comma-separated override keys to group by; default: the swept ones")
    args = parser.parse_args(argv)
    console, errors = Console(), Console(stderr=True)  # user errors on stderr, as python -m runner's
    folder = args.folder
    group_by = [k for k in args.group_by.split(",") if k] if args.group_by is not None else None
    try:
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a folder")
        if job_folders(folder):
            report_sweep(folder, args.metric, args.sort, group_by, console, every=args.all)
        elif (folder / "summary.json").is_file():
            report_run(folder, console)
        elif (folder / ".hydra").is_dir():
            raise SystemExit(f"error: {folder} is a run folder without summary.json: the run did not start, or was "
                             "killed before it wrote one")
        else:
            raise SystemExit(f"error: {folder} is neither a sweep folder (job folders 0/, 1/, ... with .hydra/ in "
                             "them) nor a run folder (summary.json): give outputs/multirun/<sweep> or "
                             "outputs/runs/<run>")
    except SystemExit as e:
        errors.print(str(e), highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

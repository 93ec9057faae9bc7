"""runner.report on a synthetic sweep folder: group means and stds against numpy by hand; the
columns the terminal shows, their order best-first, and every column in the files."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rich.console import Console

from runner.report.table import direction, main, report_sweep


def make_sweep(root: Path) -> dict:
    values = {}
    job = 0
    for loss in ("bce", "focal"):
        for seed in (0, 1, 2):
            folder = root / str(job)
            (folder / ".hydra").mkdir(parents=True)
            (folder / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- trainer.seed={seed}\n")
            value = {"bce": 0.5, "focal": 0.7}[loss] + 0.01 * seed ** 2
            values.setdefault(loss, []).append(value)
            (folder / "summary.json").write_text(json.dumps(
                {"status": "completed", "metrics": {"test/mAP": value, "val/loss": 1 - value}, "steps": 10}))
            job += 1
    failed = root / str(job)
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- loss=asl\n- trainer.seed=0\n")
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "metrics": {}, "error": "boom"}))
    return values


def test_sweep_report_means_and_stds(tmp_path, capsys):
    values = make_sweep(tmp_path)
    assert main([str(tmp_path), "--metric", "test/mAP", "--sort", "test/mAP"]) == 0
    report = pd.read_csv(tmp_path / "report.csv")
    assert list(report["loss"]) == ["focal", "bce"]  # best mAP first; asl failed: not averaged, reported
    for loss, vals in values.items():
        row = report[report["loss"] == loss].iloc[0]
        assert row["test/mAP mean"] == pytest.approx(np.mean(vals))
        assert row["test/mAP std"] == pytest.approx(np.std(vals, ddof=1))
        assert row["seeds"] == 3
    markdown = (tmp_path / "report.md").read_text()
    assert "| loss" in markdown and "±" in markdown
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 7 and (summary["status"] == "failed").sum() == 1
    assert "did not complete" in capsys.readouterr().out


def test_a_metric_that_differs_between_seeds_is_averaged_not_grouped_by(tmp_path):
    """test/active_units differs between seeds: one row per loss, with its mean over the seeds
    (not a row per value, as an override would make)."""
    units = {"elbo": [16, 15, 16], "iwae": [50, 50, 50]}
    for job, (loss, seed) in enumerate((l, s) for l in units for s in range(3)):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- trainer.seed={seed}\n")
        (folder / "summary.json").write_text(json.dumps(
            {"status": "completed", "metrics": {"test/nll": 100.0 + job, "test/active_units": units[loss][seed]}}))
    assert main([str(tmp_path), "--metric", "test/nll", "--metric", "test/active_units"]) == 0
    report = pd.read_csv(tmp_path / "report.csv")
    assert list(report.columns[:1]) == ["loss"] and len(report) == 2
    row = report[report["loss"] == "elbo"].iloc[0]
    assert row["seeds"] == 3 and row["test/active_units mean"] == pytest.approx(np.mean(units["elbo"]))


def test_report_errors_are_clear(tmp_path, capsys):
    make_sweep(tmp_path)
    assert main([str(tmp_path), "--metric", "test/nope"]) == 2
    assert "no metric test/nope" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_report_of_a_single_run(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {"test/mAP": 0.25}}))
    assert main([str(tmp_path)]) == 0
    assert "test/mAP" in capsys.readouterr().out


CLASSIFIER_METRICS = ("val/mAP", "val/loss", "test/loss", "test/macro_auroc", "test/macro_f1", "test/micro_f1",
                      "test/macro_precision", "test/macro_recall", "test/macro_f1_tuned", "test/mAP")


def make_wide_sweep(root: Path, monitor: str = "val/mAP", mode: str = "max") -> None:
    """Four losses x two learning rates x two seeds, ten metrics each, saved configs that say
    what the runs monitored."""
    job = 0
    for loss_index, loss in enumerate(("bce", "bce_pos_weight", "focal", "asl")):
        for lr in ("0.001", "0.0001"):
            for seed in (0, 1):
                folder = root / str(job)
                (folder / ".hydra").mkdir(parents=True)
                (folder / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- optim.lr={lr}\n- trainer.seed={seed}\n")
                (folder / ".hydra" / "config.yaml").write_text(f"trainer:\n  monitor: {monitor}\n  monitor_mode: {mode}\n")
                # every metric grows with the loss's index: asl is best on val/mAP, bce on val/loss
                metrics = {m: 0.1 * loss_index + 0.001 * i + 0.0001 * seed for i, m in enumerate(CLASSIFIER_METRICS)}
                (folder / "summary.json").write_text(json.dumps({"status": "completed", "metrics": metrics}))
                job += 1


def terminal_report(folder: Path, width: int, **kwargs) -> tuple[str, pd.DataFrame]:
    console = Console(width=width, file=io.StringIO())
    summary = report_sweep(folder, kwargs.pop("metrics", None), kwargs.pop("sort", None), None, console, **kwargs)
    return console.file.getvalue(), summary


def table_header(text: str) -> str:
    return next(line for line in text.splitlines() if "seeds" in line)


def test_report_shows_the_monitor_and_the_test_metrics_that_fit(tmp_path):
    make_wide_sweep(tmp_path)
    text, summary = terminal_report(tmp_path, 80)
    assert "…" not in text and max(len(line) for line in text.splitlines() if "│" in line) <= 80
    header = table_header(text)
    assert header.index("val/mAP") < header.index("test/mAP")  # the monitor, then its test counterpart
    assert "val/loss" not in header
    assert list(summary["loss"].drop_duplicates()) == ["asl", "focal", "bce_pos_weight", "bce"]  # max first
    assert "more metric(s) in report.csv" in text
    # the files keep every metric, whatever the terminal showed
    report = pd.read_csv(tmp_path / "report.csv")
    assert {f"{m} mean" for m in CLASSIFIER_METRICS} <= set(report.columns)
    assert all(m in (tmp_path / "report.md").read_text() for m in CLASSIFIER_METRICS)
    wide, _ = terminal_report(tmp_path, 200)
    assert len([m for m in CLASSIFIER_METRICS if m in table_header(wide)]) > len(
        [m for m in CLASSIFIER_METRICS if m in header])


def test_report_all_and_sort_directions(tmp_path):
    make_wide_sweep(tmp_path, monitor="val/loss", mode="min")
    text, summary = terminal_report(tmp_path, 80, every=True)
    assert "…" not in text  # squeezed cells wrap instead
    assert list(summary["loss"].drop_duplicates()) == ["bce", "bce_pos_weight", "focal", "asl"]  # min first
    _, by_f1 = terminal_report(tmp_path, 80, sort="test/macro_f1")
    assert list(by_f1["loss"].drop_duplicates())[0] == "asl"


@pytest.mark.parametrize("metric, expected", [
    ("test/mAP", "max"), ("val/macro_f1_tuned", "max"), ("test/balanced_accuracy", "max"), ("test/bound", "max"),
    ("test/nll_k5000", "min"), ("val/bpc", "min"), ("test/loss", "min"), ("test/ece", "min"),
    ("test/active_units_1", None), ("val/n", None),
])
def test_metric_directions(metric, expected):
    assert direction(metric, None, None) == expected
    assert direction(metric, metric, "max") == "max"  # the runs' monitor_mode wins for the monitor

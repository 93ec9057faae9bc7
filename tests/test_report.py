"""runner.report on a synthetic sweep folder: group means and stds against numpy by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runner.report import main


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
    assert list(report["loss"]) == ["bce", "focal"]  # asl failed: not averaged, reported
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


def test_report_errors_are_clear(tmp_path, capsys):
    make_sweep(tmp_path)
    assert main([str(tmp_path), "--metric", "test/nope"]) == 2
    assert "no metric test/nope" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2


def test_report_of_a_single_run(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "metrics": {"test/mAP": 0.25}}))
    assert main([str(tmp_path)]) == 0
    assert "test/mAP" in capsys.readouterr().out

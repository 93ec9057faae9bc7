"""Plots and the TensorBoard logger: plots/curves.png (panels, markers), the TensorBoard event
file, the multi-label PR curves, the sweep report's bar charts, runs that go on without
matplotlib, and tensorboard missing (exit 2). The other loggers: test_loggers.py."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from conftest import rejected, run_in_process
from runner.report import plots
from runner.report.table import main as report_main
from test_report import make_sweep

REGRESSION = ("experiment=regression", "trainer.progress=none", "device=cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    """A real, non-empty PNG: the signature, and an image that PIL decodes with a nonzero size."""
    Image = pytest.importorskip("PIL.Image")
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        assert image.width > 0 and image.height > 0


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(log_dir):
    """{tag: {step: value}} read back from the event file(s) with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def warnings_about(caplog, text):
    return [r for r in caplog.records if text in r.getMessage()]


@pytest.fixture
def one_thread():
    """DenseNet on a shared 2-core CPU: one intra-op thread is faster than two fighting ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib unimportable (also its already-imported submodules)."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_tensorboard_holds_the_logged_scalars_and_curves_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    code, run_dir = run_in_process(tmp_path, *REGRESSION, "logger=tensorboard")
    assert code == 0
    assert_png(run_dir / "plots" / "curves.png")
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    rows = metric_rows(run_dir)
    expected = {("train/loss", r["step"]): r["loss"] for r in rows if r["split"] == "train"}
    expected.update({("val/loss", r["step"]): r["val/loss"] for r in rows if r["split"] == "val"})
    expected.update({("test/loss", r["step"]): r["test/loss"] for r in rows if r["split"] == "test"})
    assert sum(tag == "train/loss" for tag, _ in expected) >= 2 and any(tag == "val/loss" for tag, _ in expected)
    for (tag, step), value in expected.items():
        assert scalars[tag][step] == pytest.approx(value, rel=1e-6)  # stored as float32
    assert set(scalars["train/loss"]) == {step for tag, step in expected if tag == "train/loss"}
    assert "train/lr" in scalars and "train/samples_per_s" in scalars


def test_multilabel_run_draws_pr_curves(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    code, run_dir = run_in_process(
        tmp_path, "experiment=focal_densenet", "dataset.n_train=64", "dataset.n_val=32", "dataset.n_test=32",
        "trainer.batch_size=16", "trainer.max_epochs=1", "trainer.progress=none", "device=cpu")
    assert code == 0
    assert_png(run_dir / "plots" / "pr_curves.png")
    assert_png(run_dir / "plots" / "curves.png")


def test_pr_curves_mark_both_thresholds(tmp_path):
    """Unit check of the panel contents: one curve and two operating points per label."""
    pytest.importorskip("matplotlib")
    probs, targets = torch.rand(40, 3), (torch.rand(40, 3) < 0.3).float()
    targets[:, 2] = 0  # a label without positives must not break the plot
    out = plots.plot_pr_curves(probs, targets, ["a", "b", "c"], torch.tensor([0.3, 0.6, 0.5]), tmp_path / "pr.png")
    assert_png(out)


def test_report_writes_one_bar_chart_per_metric(tmp_path):
    pytest.importorskip("matplotlib")
    make_sweep(tmp_path)
    assert report_main([str(tmp_path)]) == 0
    for metric in ("test/mAP", "val/loss"):
        assert_png(tmp_path / "plots" / plots.metric_filename(metric))
    assert plots.metric_filename("test/mAP") == "report_test_mAP.png"


def test_run_without_matplotlib_completes_and_warns_once(tmp_path, recwarn, no_matplotlib):
    code, run_dir = run_in_process(tmp_path, *REGRESSION)
    assert plots.plot_curves(run_dir / "metrics.jsonl", tmp_path / "again.png") is None
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert not (run_dir / "plots" / "curves.png").exists()
    said = [w for w in recwarn if "matplotlib is not installed: no plots" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in recwarn]


def test_a_failing_plot_does_not_fail_the_run(tmp_path, caplog, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(plots, "plot_curves", broken)
    with caplog.at_level(logging.WARNING, logger="runner"):
        code, run_dir = run_in_process(tmp_path, *REGRESSION)
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert len(warnings_about(caplog, "could not draw plots/curves.png: RuntimeError: no ink")) == 1


def test_tensorboard_absent_exits_2_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    code, error = rejected(tmp_path, *REGRESSION, "logger=tensorboard")
    assert code == 2 and error == "logger=tensorboard needs tensorboard: pip install 'runner[tensorboard]'"
    assert not (tmp_path / "run").exists()  # rejected before it trained: no folder, no tensorboard/ in it


def test_a_resumed_run_shows_each_step_once(tmp_path):
    """Resume logs again the steps after the last checkpoint: the curves and TensorBoard keep the
    later value of each step."""
    pytest.importorskip("tensorboard")
    from runner.engine.results import RunResults
    from runner.loggers import RunInfo

    run = RunInfo(run_dir=tmp_path, output_root=tmp_path, name="interrupted", title="interrupted")
    first = RunResults(tmp_path, run=run, logger=["tensorboard"])
    for step in (4, 8, 12):
        first.log({"epoch": 0, "step": step, "split": "train", "loss": float(step)})
    first.finish()
    resumed = RunResults(tmp_path, run=run, logger=["tensorboard"])  # restarted from the checkpoint of step 6
    for step in (8, 12, 16):
        resumed.log({"epoch": 0, "step": step, "split": "train", "loss": 100.0 + step})
    resumed.finish()
    want = {4: 4.0, 8: 108.0, 12: 112.0, 16: 116.0}
    assert plots.series(metric_rows(tmp_path), "train", "loss") == (list(want), list(want.values()))
    assert tensorboard_scalars(tmp_path / "tensorboard")["train/loss"] == want


def rows_of(steps, split="train", **series):
    """metrics.jsonl rows: one per step, each series' value at it."""
    return [{"epoch": 0, "step": step, "split": split, **{k.replace("__", "/"): v[i] for k, v in series.items()}}
            for i, step in enumerate(steps)]


def test_curves_mark_few_points_skip_flat_panels_and_give_the_lr_its_own_panel():
    pytest.importorskip("matplotlib")
    rows = rows_of([4, 8, 12], loss=[3.0, 2.0, 1.5], lr=[0.1, 0.1, 0.1])  # a constant schedule
    rows += rows_of([12], split="val", val__loss=[1.7], val__n=[64.0])  # one validation
    rows += rows_of([24], split="val", val__loss=[1.4], val__n=[64.0])
    fig = plots.curves_figure(rows, title="regression-optim=adam")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"train loss", "val/loss"}  # lr and val/n are flat: left out
    assert all(ax.lines[0].get_marker() == "o" for ax in panels.values())  # 3 and 2 points: marked
    assert fig._suptitle.get_text() == "regression-optim=adam"

    decaying = rows_of(range(1, 101), loss=[1 / s for s in range(1, 101)], lr=[0.1 * 0.9 ** s for s in range(100)])
    panels = {ax.get_title(): ax for ax in plots.curves_figure(decaying).axes if ax.get_visible()}
    assert set(panels) == {"train loss", "learning rate"}
    assert len(panels["learning rate"].lines) == 1 and panels["learning rate"].get_yscale() == "log"
    assert panels["train loss"].lines[0].get_marker() in ("None", None, "")  # 100 points: a line


def test_curves_draw_one_series_once_and_a_wide_positive_one_on_a_log_axis():
    pytest.importorskip("matplotlib")
    first_val = [63076.0, 101.2, 95.0, 93.1]  # an untrained first evaluation, as a density run's can be
    rows = rows_of([4, 8, 12, 16], loss=[900.0, 120.0, 99.0, 97.0], lr=[0.1] * 4)
    rows += rows_of([4, 8, 12, 16], split="val", val__loss=first_val, val__nll=list(first_val),
                    val__bound=[-63076.0, -101.2, -95.0, -93.1], val__accuracy=[0.5, 0.6, 0.65, 0.7])
    panels = {ax.get_title(): ax for ax in plots.curves_figure(rows).axes if ax.get_visible()}
    assert set(panels) == {"train loss", "val/loss = val/nll", "val/bound", "val/accuracy"}
    merged = panels["val/loss = val/nll"]
    assert len(merged.lines) == 1 and list(merged.lines[0].get_ydata()) == first_val
    assert merged.get_yscale() == "log"  # positive, 63076 / 93.1 > 100
    assert panels["train loss"].get_yscale() == "linear"  # 900 / 97 < 100
    assert panels["val/bound"].get_yscale() == "linear"  # negative: no log axis
    assert panels["val/accuracy"].get_yscale() == "linear"


def test_pr_curves_keep_the_point_at_half_visible_on_the_tuned_one():
    pytest.importorskip("matplotlib")
    probs, targets = torch.rand(40, 2), (torch.rand(40, 2) < 0.4).float()
    fig = plots.pr_figure(probs, targets, ["a", "b"], torch.tensor([0.5, 0.5]))  # both thresholds coincide
    for ax in fig.axes[:2]:
        marks = {line.get_label(): line for line in ax.lines if line.get_marker() in ("o", "s")}
        half, tuned = marks["at 0.5"], marks["at 0.5 (val-tuned)"]
        assert half.get_xydata().tolist() == tuned.get_xydata().tolist()  # the same point
        assert half.get_zorder() > tuned.get_zorder()  # the 0.5 square on top...
        assert tuned.get_markerfacecolor() == "none" and tuned.get_markersize() > half.get_markersize()  # ...in a ring

"""The run's and the sweep's plots, drawn with matplotlib's object API (no pyplot global state).

* ``plot_curves``: ``plots/curves.png`` of a run, from its metrics.jsonl — training loss and
  learning rate against the step, and one panel per validation metric (``val/loss``,
  ``val/mAP``, ``val/bpc``, ...);
* ``plot_pr_curves``: ``plots/pr_curves.png`` of a multi-label test evaluation — one
  precision-recall panel per label with its operating points at 0.5 and at the val-tuned threshold;
* ``plot_report_bars``: ``<sweep>/plots/report_<metric>.png`` — each metric's mean ± std per group.

Plots are extras: without matplotlib they are skipped with one warning per process, and
``draw_safely`` turns any error while drawing into a logged warning, so a plot never fails a run.
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from runner.files import atomic_write

log = logging.getLogger(__name__)
PANEL_SIZE = (4.0, 3.0)  # inches per panel
_warned_no_matplotlib = False


def figure_class() -> type | None:
    """matplotlib's Figure, or None (warned once per process) where matplotlib is not installed."""
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_no_matplotlib:
            log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
            _warned_no_matplotlib = True
        return None
    return Figure


def draw_safely(what: str, draw: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``draw``; an error is logged (traceback in run.log) and the run goes on."""
    try:
        return draw(*args, **kwargs)
    except Exception as e:
        log.warning("could not draw %s: %s: %s", what, type(e).__name__, e)
        log.debug("traceback of the failed plot", exc_info=True)
        return None


def save(fig: Any, path: Path) -> Path:
    # Atomic, like every other file of the run folder: a kill never leaves half a PNG.
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    return path


def panel_grid(fig: Any, count: int, columns: int = 3) -> list[Any]:
    """``count`` axes on a grid at most ``columns`` wide; the unused cells are hidden."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig.set_size_inches(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return axes[:count]


# --- run curves ------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    """A metric value as a float (metrics.jsonl stores NaN and inf as strings), else None."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_metrics(metrics_jsonl: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]


def series(rows: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the rows of one split that have a step. A resumed run
    logs again the steps after its last checkpoint: the later row of a step wins."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = _number(row.get(key))
        if row.get("split") == split and row.get("step") is not None and value is not None:
            by_step[row["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def validation_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """Summary metrics of the val rows (one '/': ``val/mAP``, not ``val/ap/<label>``), in log order."""
    names: dict[str, None] = {}
    for row in rows:
        if row.get("split") == "val" and row.get("step") is not None:
            names.update((k, None) for k in row if k.startswith("val/") and k.count("/") == 1)
    return list(names)


def _draw_training(ax: Any, rows: list[dict[str, Any]]) -> None:
    steps, loss = series(rows, "train", "loss")
    ax.plot(steps, loss, color="tab:blue", marker="." if len(steps) < 50 else None, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_title("training")
    lr_steps, lr = series(rows, "train", "lr")
    if lr_steps:
        lr_axis = ax.twinx()  # lr and loss differ by orders of magnitude: a second scale
        lr_axis.plot(lr_steps, lr, color="tab:orange", linestyle="--")
        lr_axis.set_ylabel("learning rate", color="tab:orange")


def plot_curves(metrics_jsonl: Path, out_png: Path, title: str | None = None) -> Path | None:
    """Training loss and lr, and each validation metric, against the step. None when there is
    nothing to draw (an evaluation-only run) or no matplotlib."""
    Figure = figure_class()
    if Figure is None or not Path(metrics_jsonl).is_file():
        return None
    rows = read_metrics(metrics_jsonl)
    has_training = bool(series(rows, "train", "loss")[0])
    val_names = validation_metrics(rows)
    if not has_training and not val_names:
        return None
    fig = Figure()
    axes = panel_grid(fig, int(has_training) + len(val_names))
    if has_training:
        _draw_training(axes.pop(0), rows)
    for ax, name in zip(axes, val_names):
        steps, values = series(rows, "val", name)
        ax.plot(steps, values, marker="o", color="tab:green")
        ax.set_xlabel("step")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, Path(out_png))


# --- multi-label precision-recall ------------------------------------------------------------
def _operating_point(probs: Tensor, targets: Tensor, threshold: float) -> tuple[float, float]:
    """(recall, precision) of one label at ``threshold`` (predicted positive when p >= threshold)."""
    predicted, actual = probs >= threshold, targets.bool()
    tp = float((predicted & actual).sum())
    precision = tp / float(predicted.sum()) if predicted.any() else 0.0
    recall = tp / float(actual.sum()) if actual.any() else 0.0
    return recall, precision


def plot_pr_curves(probs: Tensor, targets: Tensor, label_names: list[str], tuned: Tensor | None,
                   out_png: Path) -> Path | None:
    """One precision-recall panel per label, marking the points at 0.5 and at the tuned threshold."""
    Figure = figure_class()
    if Figure is None:
        return None
    from torchmetrics.functional.classification import multilabel_precision_recall_curve

    probs, targets = probs.float().cpu(), targets.long().cpu()
    with warnings.catch_warnings():  # a label without positives: said in its panel's title instead
        warnings.simplefilter("ignore", UserWarning)
        precision, recall, _ = multilabel_precision_recall_curve(probs, targets, len(label_names))
    fig = Figure()
    for label, ax in enumerate(panel_grid(fig, len(label_names), columns=4)):
        p, t = probs[:, label], targets[:, label]
        ax.plot(recall[label].numpy(), precision[label].numpy(), color="tab:blue", drawstyle="steps-post")
        ax.plot(*_operating_point(p, t, 0.5), "s", color="tab:red", label="at 0.5")
        if tuned is not None:
            threshold = float(tuned[label])
            ax.plot(*_operating_point(p, t, threshold), "o", color="tab:green", label=f"at {threshold:.3g} (val-tuned)")
        positives = int(t.sum())
        ax.set_title(f"{label_names[label]} ({positives} positive{'s' if positives != 1 else ''})", fontsize=9)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return save(fig, Path(out_png))


# --- sweep report ----------------------------------------------------------------------------
def metric_filename(metric: str) -> str:
    """``test/mAP`` -> ``report_test_mAP.png``: only characters that are safe in any file system."""
    return f"report_{re.sub(r'[^A-Za-z0-9._-]+', '_', metric).strip('_')}.png"


def group_names(summary: Any, group_by: list[str]) -> list[str]:
    """One tick label per row: ``loss=focal, lr=0.001`` (the last part of each override key)."""
    if not group_by:
        return ["all"] * len(summary)
    return [", ".join(f"{key.split('.')[-1]}={value}" for key, value in zip(group_by, row))
            for row in summary[group_by].itertuples(index=False)]


def plot_report_bars(summary: Any, group_by: list[str], metrics: list[str], out_dir: Path) -> list[Path]:
    """One bar chart per metric: its mean per group with the std over seeds as the error bar.
    ``summary`` is the report's table (columns ``<group keys>``, ``<metric> mean``, ``<metric> std``)."""
    Figure = figure_class()
    if Figure is None or summary.empty:
        return []
    names = group_names(summary, group_by)
    tilted = len(names) > 3  # long group names side by side would overlap
    written = []
    for metric in metrics:
        means = summary[f"{metric} mean"].astype(float)
        stds = summary[f"{metric} std"].astype(float).fillna(0.0)  # one seed: no error bar
        fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.5))
        ax = fig.subplots()
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30 if tilted else 0,
                      ha="right" if tilted else "center", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean ± std over seeds")
        fig.tight_layout()
        written.append(save(fig, Path(out_dir) / metric_filename(metric)))
    return written

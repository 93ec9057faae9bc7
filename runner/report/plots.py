"""The run's and the sweep's plots, drawn with matplotlib's object API (no pyplot global state).

* ``plot_curves``: ``plots/curves.png`` of a run, from its metrics.jsonl — training loss,
  learning rate and each validation metric (``val/loss``, ``val/mAP``, ``val/bpc``, ...)
  against the step, one panel each, flat ones left out, points marked where there are few;
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

from runner.runs.files import atomic_write, read_rows

log = logging.getLogger(__name__)
PANEL_SIZE = (4.0, 3.0)  # inches per panel


def figure_class() -> type | None:
    """matplotlib's Figure, or None where matplotlib is not installed (a warning, which Python
    shows once per process)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots (pip install matplotlib)", RuntimeWarning, stacklevel=2)
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
    return read_rows(metrics_jsonl)


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


FEW_POINTS = 30  # up to this many log points a curve also marks each point: one point is no line


def varies(values: list[float]) -> bool:
    """False for a flat series (the lr of a constant schedule, a sample count): its panel would
    say nothing. A single point is drawn (as a marker)."""
    return len(values) == 1 or max(values) - min(values) > 1e-12 * max(1.0, abs(max(values)))


def same_series(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> bool:
    return a[0] == b[0] and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a[1], b[1]))


def curve_panels(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(panel title, split, key) of each curve worth drawing: training loss, learning rate (its
    own panel: it and the loss differ by orders of magnitude), each validation metric. Metrics
    that are one series under two names (a density run's val/loss and val/nll) share a panel,
    titled with both names."""
    panels = [("train loss", "train", "loss"), ("learning rate", "train", "lr")]
    panels += [(name, "val", name) for name in validation_metrics(rows)]
    drawn: list[tuple[str, str, str]] = []
    for title, split, key in panels:
        values = series(rows, split, key)
        if not values[1] or not varies(values[1]):
            continue
        twin = next((i for i, (_, s, k) in enumerate(drawn) if s == split and same_series(series(rows, s, k), values)), None)
        if twin is None:
            drawn.append((title, split, key))
        else:
            drawn[twin] = (f"{drawn[twin][0]} = {title}", *drawn[twin][1:])
    return drawn


LOG_SPAN = 100  # a positive series over more than this factor gets a log axis: a huge first loss flattens the rest
LR_LOG_SPAN = 10  # the lr's warm-up and decay: over a decade already


def log_axis(key: str, values: list[float]) -> bool:
    return min(values) > 0 and max(values) / min(values) > (LR_LOG_SPAN if key == "lr" else LOG_SPAN)


def curves_figure(rows: list[dict[str, Any]], title: str | None = None) -> Any:
    """The figure of ``plot_curves`` (None: nothing to draw, or no matplotlib)."""
    Figure = figure_class()
    panels = curve_panels(rows)
    if Figure is None or not panels:
        return None
    from matplotlib.ticker import MaxNLocator

    fig = Figure()
    colors = {"train": "tab:blue", "val": "tab:green"}
    for ax, (name, split, key) in zip(panel_grid(fig, len(panels)), panels):
        steps, values = series(rows, split, key)
        ax.plot(steps, values, color="tab:orange" if key == "lr" else colors[split],
                marker="o" if len(steps) <= FEW_POINTS else None, markersize=4)
        if log_axis(key, values):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps: no 15.25 ticks
        ax.set_xlabel("step")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(metrics_jsonl: Path, out_png: Path, title: str | None = None) -> Path | None:
    """Training loss, learning rate and each validation metric against the step, one panel each;
    flat ones are left out. None when there is nothing to draw (an evaluation-only run) or no
    matplotlib."""
    if not Path(metrics_jsonl).is_file():
        figure_class()  # says once that there is no matplotlib, where there is none
        return None
    fig = curves_figure(read_metrics(metrics_jsonl), title)
    return save(fig, Path(out_png)) if fig is not None else None


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
    fig = pr_figure(probs, targets, label_names, tuned)
    return save(fig, Path(out_png)) if fig is not None else None


def pr_figure(probs: Tensor, targets: Tensor, label_names: list[str], tuned: Tensor | None) -> Any:
    """The figure of ``plot_pr_curves`` (None without matplotlib)."""
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
        if tuned is not None:
            # A large hollow ring under a small filled square: where the tuned threshold gives
            # the same point as 0.5 (often), both marks stay visible.
            threshold = float(tuned[label])
            ax.plot(*_operating_point(p, t, threshold), "o", color="tab:green", markersize=11, markerfacecolor="none",
                    markeredgewidth=2, zorder=3, label=f"at {threshold:.3g} (val-tuned)")
        ax.plot(*_operating_point(p, t, 0.5), "s", color="tab:red", markersize=5, zorder=4, label="at 0.5")
        positives = int(t.sum())
        ax.set_title(f"{label_names[label]} ({positives} positive{'s' if positives != 1 else ''})", fontsize=9)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


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


# --- single-label confusion matrix -----------------------------------------------------------
CELL_NUMBERS_UP_TO = 20  # classes; past it the numbers would not fit in the cells
TICK_LABELS_UP_TO = 100  # classes; past it every k-th class is named


def plot_confusion_matrix(confusion: Tensor, class_names: list[str], out_png: Path) -> Path | None:
    """The confusion matrix (rows: true class, columns: predicted) normalised by true class, so
    each row is that class's distribution of predictions and the diagonal is its recall. Each cell
    shows its value up to 20 classes; the figure grows with the classes (names all shown up to 100)."""
    Figure = figure_class()
    if Figure is None:
        return None
    counts = confusion.double().cpu()
    rows = counts.sum(1, keepdim=True)
    normalised = (counts / rows.clamp_min(1)).numpy()  # a class absent from the split: a row of zeros
    c = len(class_names)
    side = min(max(4.5, 0.22 * c + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    step = 1 if c <= TICK_LABELS_UP_TO else math.ceil(c / 50)
    ticks = list(range(0, c, step))
    cell_points = 0.75 * side * 72 / c  # about 3/4 of the figure's height is the matrix
    fontsize = min(9.0, max(4.0, 0.55 * cell_points * step))
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90 if c > 10 else 45,
                  ha="center" if c > 10 else "right", fontsize=fontsize)
    ax.set_yticks(ticks, [class_names[i] for i in ticks], fontsize=fontsize)
    if c <= CELL_NUMBERS_UP_TO:
        for (i, j), value in ((ij, normalised[ij]) for ij in [(i, j) for i in range(c) for j in range(c)]):
            if value > 0 or i == j:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
    big = 10 + side / 3  # axis labels and title keep their size relative to a large figure
    ax.set_xlabel("predicted class", fontsize=big)
    ax.set_ylabel("true class", fontsize=big)
    ax.set_title(f"confusion matrix, normalised by true class ({int(counts.sum())} samples)", fontsize=big)
    fig.tight_layout()
    return save(fig, Path(out_png))

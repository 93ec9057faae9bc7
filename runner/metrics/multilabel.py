"""Multi-label metrics from the full rows of probabilities and 0/1 targets.

The evaluator keeps every row (concatenated across processes before ``compute``), so AP and
AUROC are exact, not binned. Conventions (those of scikit-learn):

* a label is predicted positive when its probability is >= its threshold (0.5, or tuned);
* precision, recall and F1 are 0 where their denominator is 0;
* AP is undefined (nan) for a label with no positive, AUROC for a label with no positive or no
  negative; ``mAP`` and ``macro_auroc`` average the labels where they are defined;
* tuned thresholds maximise each label's F1 on the split they are tuned on (val) and are then
  applied unchanged to another split (test).
"""
from __future__ import annotations

import math
import warnings

import pandas as pd
import torch
from torch import Tensor
from torchmetrics.functional.classification import multilabel_auroc, multilabel_average_precision


def confusion_counts(probs: Tensor, targets: Tensor, thresholds: Tensor) -> dict[str, Tensor]:
    """TP, FP, FN, TN per label [L] at per-label thresholds [L]."""
    predicted = probs >= thresholds
    actual = targets.bool()
    return {
        "tp": (predicted & actual).sum(0),
        "fp": (predicted & ~actual).sum(0),
        "fn": (~predicted & actual).sum(0),
        "tn": (~predicted & ~actual).sum(0),
    }


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def scores_at(probs: Tensor, targets: Tensor, thresholds: Tensor) -> dict[str, Tensor]:
    """Confusion counts plus precision, recall, F1 and predicted-positive rate per label."""
    counts = confusion_counts(probs, targets, thresholds)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    return {
        **counts,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "pred_pos_rate": (tp + fp).double() / max(len(probs), 1),
    }


def micro_f1(scores: dict[str, Tensor]) -> float:
    tp, fp, fn = (scores[k].sum().double() for k in ("tp", "fp", "fn"))
    return float(_ratio(2 * tp, 2 * tp + fp + fn))


def ranking_scores(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(AP, AUROC) per label, exact; nan where undefined (see the module docstring)."""
    num_labels = targets.shape[1]
    target_int = targets.long()
    positives, negatives = target_int.sum(0), (1 - target_int).sum(0)
    with warnings.catch_warnings():  # torchmetrics warns of labels without positives: they become nan below
        warnings.simplefilter("ignore", UserWarning)
        ap = multilabel_average_precision(probs.float(), target_int, num_labels, average=None).double()
        auroc = multilabel_auroc(probs.float(), target_int, num_labels, average=None).double()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    ap = torch.where(positives > 0, ap, nan)
    auroc = torch.where((positives > 0) & (negatives > 0), auroc, nan)
    return ap, auroc


def tune_thresholds(probs: Tensor, targets: Tensor) -> Tensor:
    """Per-label threshold maximising F1 (the highest one among ties); 0.5 for a label with no
    positive. The threshold is the midpoint between the lowest probability predicted positive and
    the next lower probability, so it does not sit on a training-set value."""
    thresholds = torch.full((probs.shape[1],), 0.5, dtype=torch.float64)
    for label in range(probs.shape[1]):
        p, t = probs[:, label].double(), targets[:, label].double()
        if t.sum() == 0:
            continue
        order = torch.argsort(p, descending=True)
        p, t = p[order], t[order]
        # Cut after the last copy of each distinct value: a threshold cannot split ties.
        last_of_value = torch.cat([p[1:] != p[:-1], torch.tensor([True])])
        tp = torch.cumsum(t, 0)[last_of_value]
        predicted = torch.arange(1, len(p) + 1, dtype=torch.float64)[last_of_value]
        f1 = 2 * tp / (predicted + t.sum())
        best = int(torch.argmax(f1))  # argmax returns the first maximum: the highest threshold
        values = p[last_of_value]
        lower = values[best + 1] if best + 1 < len(values) else values[best] / 2
        thresholds[label] = (values[best] + lower) / 2
    return thresholds


def multilabel_metrics(
    probs: Tensor,
    targets: Tensor,
    label_names: list[str],
    tuned_thresholds: Tensor | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """(flat summary metrics, per-label table). With ``tuned_thresholds`` the table and the
    metrics also hold the scores at those thresholds (``*_tuned``)."""
    probs, targets = probs.double(), targets.double()
    num_labels = targets.shape[1]
    at_half = scores_at(probs, targets, torch.full((num_labels,), 0.5, dtype=torch.float64))
    ap, auroc = ranking_scores(probs, targets)
    table = pd.DataFrame({"label": label_names, "prevalence": targets.mean(0).numpy()})
    table["pred_pos_rate"] = at_half["pred_pos_rate"].numpy()
    for key in ("tp", "fp", "fn", "tn", "precision", "recall", "f1"):
        table[key] = at_half[key].numpy()
    table["ap"], table["auroc"] = ap.numpy(), auroc.numpy()

    metrics = {
        "mAP": float(torch.nanmean(ap)) if not torch.isnan(ap).all() else math.nan,
        "macro_auroc": float(torch.nanmean(auroc)) if not torch.isnan(auroc).all() else math.nan,
        "macro_f1": float(at_half["f1"].mean()),
        "micro_f1": micro_f1(at_half),
        "macro_precision": float(at_half["precision"].mean()),
        "macro_recall": float(at_half["recall"].mean()),
    }
    for i, name in enumerate(label_names):
        for key in ("precision", "recall", "f1"):
            metrics[f"{key}/{name}"] = float(at_half[key][i])
        metrics[f"ap/{name}"], metrics[f"auroc/{name}"] = float(ap[i]), float(auroc[i])

    if tuned_thresholds is not None:
        tuned = scores_at(probs, targets, tuned_thresholds.double())
        table["threshold_tuned"] = tuned_thresholds.double().numpy()
        for key in ("pred_pos_rate", "tp", "fp", "fn", "precision", "recall", "f1"):
            table[f"{key}_tuned"] = tuned[key].numpy()
        metrics["macro_f1_tuned"] = float(tuned["f1"].mean())
        metrics["micro_f1_tuned"] = micro_f1(tuned)
        for i, name in enumerate(label_names):
            for key in ("precision", "recall", "f1"):
                metrics[f"{key}_tuned/{name}"] = float(tuned[key][i])
    return metrics, table

"""Single-label classification metrics from additive sums, so they are exact under any number of
processes: each process adds up ``batch_sums`` over its shard, the engine sums the shards, and
``classification_metrics`` turns the totals into metrics. Nothing per sample is kept.

The sums: the confusion matrix [C, C] (row: true class, column: predicted class), the summed
negative log-likelihood, the number of samples whose class is among the 5 largest logits, and
three per-bin sums of the calibration bins (samples, summed confidence, summed correctness).

Conventions (those of scikit-learn, which the tests check against):

* the prediction is the arg-max of the logits; its softmax probability is the confidence;
* precision, recall and F1 of a class are 0 where their denominator is 0;
* ``macro_f1`` (and ``macro_precision``, ``macro_recall``) average the classes that occur in the
  split's labels or predictions (``f1_score(average="macro")`` without ``labels``): a class absent
  from the split and never predicted does not count;
* ``balanced_accuracy`` is the mean recall over the classes that occur in the split's labels
  (``balanced_accuracy_score``);
* ``top5_accuracy`` is reported only where C > 5 (with 5 or fewer classes it is always 1);
* ``ece`` (expected calibration error, Guo et al. 2017) uses 15 equal-width confidence bins
  [0, 1/15), [1/15, 2/15), ..., [14/15, 1] (as torchmetrics' ``calibration_error``):
  ``sum_b |accuracy_b - confidence_b| * n_b / N``.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

ECE_BINS = 15
TOP_K = 5
# Up to this many classes, per-class precision / recall / F1 are metrics as well (they are
# always in per_class.csv); past it they would flood metrics.jsonl and the terminal table.
PER_CLASS_METRICS_UP_TO = 20


def batch_sums(logits: Tensor, targets: Tensor, num_classes: int) -> dict[str, Tensor]:
    """The additive state of one batch; every value is a sum over the batch's samples."""
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=1)
    confidence, predicted = log_probs.max(1)
    confidence = confidence.exp()
    correct = (predicted == targets).float()
    # Integer counts: bincount without weights is deterministic on every device.
    confusion = torch.bincount(targets * num_classes + predicted, minlength=num_classes**2)
    boundaries = torch.linspace(0, 1, ECE_BINS + 1, dtype=confidence.dtype, device=confidence.device)[1:-1]
    bins = F.one_hot(torch.bucketize(confidence, boundaries, right=True), ECE_BINS).double()  # [B, bins]
    sums = {
        "confusion": confusion.view(num_classes, num_classes),
        "nll": -log_probs.gather(1, targets[:, None]).double().sum(),
        "ece_count": bins.sum(0),
        # One-hot products rather than weighted bincount / scatter_add: deterministic on a GPU.
        "ece_confidence": (bins * confidence.double()[:, None]).sum(0),
        "ece_correct": (bins * correct.double()[:, None]).sum(0),
    }
    if num_classes > TOP_K:
        top = logits.topk(TOP_K, dim=1).indices
        sums["top5_correct"] = (top == targets[:, None]).any(1).sum()
    return sums


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def classification_metrics(sums: dict[str, Tensor], class_names: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """(flat metrics, per-class table) from the summed state (see the module docstring)."""
    confusion = sums["confusion"].double().cpu()
    n = float(confusion.sum())
    tp = confusion.diagonal()
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    seen = (support > 0) | (predicted > 0)
    ece = (sums["ece_correct"].double() - sums["ece_confidence"].double()).abs().sum() / max(n, 1)
    metrics = {
        "accuracy": float(tp.sum()) / max(n, 1),
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "macro_precision": float(precision[seen].mean()) if seen.any() else 0.0,
        "macro_recall": float(recall[seen].mean()) if seen.any() else 0.0,
        "nll": float(sums["nll"]) / max(n, 1),
        "ece": float(ece),
    }
    if "top5_correct" in sums:
        metrics["top5_accuracy"] = float(sums["top5_correct"]) / max(n, 1)
    if len(class_names) <= PER_CLASS_METRICS_UP_TO:
        for i, name in enumerate(class_names):
            metrics[f"precision/{name}"] = float(precision[i])
            metrics[f"recall/{name}"] = float(recall[i])
            metrics[f"f1/{name}"] = float(f1[i])
    table = pd.DataFrame({
        "class": class_names,
        "support": support.long().numpy(),
        "predicted": predicted.long().numpy(),
        "tp": tp.long().numpy(),
        "fp": (predicted - tp).long().numpy(),
        "fn": (support - tp).long().numpy(),
        "precision": precision.numpy(),
        "recall": recall.numpy(),
        "f1": f1.numpy(),
    })
    return metrics, table


def confusion_frame(confusion: Tensor, class_names: list[str]) -> pd.DataFrame:
    """The confusion matrix as a table: rows are true classes, columns predicted classes."""
    frame = pd.DataFrame(confusion.long().cpu().numpy(), index=class_names, columns=class_names)
    frame.index.name = "true \\ predicted"
    return frame

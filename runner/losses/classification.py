"""Single-label classification losses on logits [B, C] and class indices [B], each returning a
per-sample loss [B]; the family sums them and the engine divides by the number of samples.

Options (runner/conf/loss/<name>.yaml):

* ``softmax_cross_entropy``: cross-entropy of the softmax, with optional ``label_smoothing``
  (PyTorch's: the target is ``(1 - eps)`` on the true class plus ``eps / C`` on every class).
* ``weighted_cross_entropy``: the same with a weight per class from the training label counts,
  ``w_c = N / (C * n_c)`` (scikit-learn's "balanced" weights): a class at its fair share
  ``N / C`` gets 1, a class 10 times rarer gets 10, and the mean weight over the training samples
  is exactly 1, so the loss keeps the scale of the unweighted one. Sample i's loss is
  ``w_{y_i} * CE_i`` (the per-sample form of ``nn.CrossEntropyLoss(weight=w, reduction="none")``;
  summed and divided by the batch, not by the summed weights). A class with no training example
  gets the neutral weight 1, with a warning.
* ``softmax_focal``: multi-class focal loss (Lin et al. 2017), ``-alpha_{y} (1 - p_y)**gamma log p_y``
  with ``p = softmax(logits)``; ``gamma=0`` is the cross-entropy. ``alpha``: null (none), one
  value per class, or ``balanced`` for the weights of ``weighted_cross_entropy``.
  ``(1 - p_y)`` is computed as ``-expm1(log p_y)``, exact where ``p_y`` is close to 1.

``class_counts`` (training samples per class) and ``class_names`` are supplied by the family.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner.errors import UserError

log = logging.getLogger("runner")


def balanced_class_weights(class_counts: list[int] | Tensor, class_names: list[str] | None = None) -> Tensor:
    """``N / (C * n_c)`` per class; 1 (neutral) for a class with no training example, warned."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    empty = counts == 0
    if empty.any():
        names = [class_names[i] if class_names else str(i) for i in empty.nonzero().flatten().tolist()]
        log.warning("class weights: %s ha%s no training example; given the neutral weight 1",
                    ", ".join(names), "s" if len(names) == 1 else "ve")
    weights = counts.sum() / (len(counts) * counts.clamp_min(1))
    return torch.where(empty, torch.ones_like(weights), weights).to(torch.float32)


def _check_smoothing(label_smoothing: float) -> float:
    if not 0 <= label_smoothing < 1:
        raise UserError(f"loss.label_smoothing={label_smoothing} must lie in [0, 1)")
    return float(label_smoothing)


class CrossEntropy(nn.Module):
    """Per-sample softmax cross-entropy; the class weights are a buffer (they follow ``.to``)."""

    def __init__(self, class_weight: Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("class_weight", class_weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        # float32 at least: a log-softmax of bf16 logits loses the small probabilities.
        return F.cross_entropy(logits.float(), targets, weight=self.class_weight,
                               label_smoothing=self.label_smoothing, reduction="none")


class SoftmaxFocal(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: Tensor | None = None) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.register_buffer("alpha", alpha)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        # clamp: (1 - p)**gamma has an infinite slope at p = 1 for gamma < 1; the clamp keeps it finite.
        modulator = (-torch.expm1(log_p)).clamp_min(1e-30) ** self.gamma
        loss = -modulator * log_p
        return loss * self.alpha[targets] if self.alpha is not None else loss


# Builders: the config options. class_counts and class_names are supplied by the family.

def softmax_cross_entropy(label_smoothing: float = 0.0) -> CrossEntropy:
    return CrossEntropy(label_smoothing=_check_smoothing(label_smoothing))


def weighted_cross_entropy(class_counts: list, label_smoothing: float = 0.0,
                           class_names: list | None = None) -> CrossEntropy:
    return CrossEntropy(balanced_class_weights(class_counts, class_names), _check_smoothing(label_smoothing))


def softmax_focal(gamma: float = 2.0, alpha: list[float] | str | None = None, class_counts: list | None = None,
                  class_names: list | None = None) -> SoftmaxFocal:
    if gamma < 0:
        raise UserError(f"loss.gamma={gamma} must be >= 0")
    if isinstance(alpha, str):
        if alpha != "balanced":
            raise UserError(f"loss.alpha={alpha!r} is not known; allowed: null, balanced, or one weight per class")
        if class_counts is None:
            raise UserError("loss.alpha=balanced needs the training class counts (supplied by the classification family)")
        return SoftmaxFocal(gamma, balanced_class_weights(class_counts, class_names))
    if alpha is not None:
        if class_counts is not None and len(alpha) != len(class_counts):
            raise UserError(f"loss.alpha has {len(alpha)} values; the dataset has {len(class_counts)} classes")
        if any(float(a) < 0 for a in alpha):
            raise UserError(f"loss.alpha={list(alpha)} must be >= 0")
        return SoftmaxFocal(gamma, torch.tensor([float(a) for a in alpha]))
    return SoftmaxFocal(gamma)

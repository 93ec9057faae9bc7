"""Multi-label losses on logits, each returning a per-sample loss [B] (mean over the labels).

Every loss works on logits (never on probabilities: a focal loss applied to ``sigmoid`` outputs
loses precision exactly where it matters) and stays finite, with finite gradients, at logits of
±100. The per-label weights come from the training labels: the multilabel family passes
``pos_counts`` (positives per label) and ``num_samples`` to the builders below, so a config never
holds counts by hand.

Options (runner/conf/loss/<name>.yaml):

* ``bce``: plain binary cross-entropy.
* ``bce_pos_weight``: BCE with ``pos_weight = negatives / positives`` per label (PyTorch's
  ``BCEWithLogitsLoss(pos_weight=...)``). It multiplies the positive term only, so it moves every
  decision boundary towards predicting positives: good recall, many false positives at 0.5.
* ``bce_inverse_freq``: BCE with a per-label weight on the whole term of label l,
  ``w_l = (N / n_l)`` scaled so that the weights sum to L (mean 1, same loss scale as ``bce``).
  It shifts the gradient share towards rare labels without changing any label's positive/negative
  balance, so each label's minimiser is still its true probability (thresholds stay near 0.5).
* ``focal``: sigmoid focal loss (Lin et al. 2017), ``alpha_t * (1 - p_t)**gamma * BCE``. With a
  scalar alpha it equals ``torchvision.ops.sigmoid_focal_loss``; ``alpha`` may also be one value
  per label, or null for no alpha weighting. ``(1 - p_t)**gamma`` is computed as
  ``exp(gamma * logsigmoid(-z))``, which stays exact where ``1 - sigmoid`` rounds to zero.
* ``asl``: asymmetric loss (Ridnik et al. 2021): ``-(1-p)**gamma_pos * log(p)`` on positives and
  ``-p_m**gamma_neg * log(1 - p_m)`` on negatives with the shifted probability
  ``p_m = max(p - clip, 0)`` (easy negatives below ``clip`` are discarded). As in the authors'
  code, probabilities inside the logs are clamped at ``eps``; ``eps=0`` removes the clamp.
* ``class_balanced``: Cui et al. 2019. Label l gets ``(1 - beta) / (1 - beta**n_l)``, the inverse
  of its effective number of samples, scaled so the weights sum to L; the weight multiplies the
  whole term of label l of the ``base`` loss, ``focal`` (default, with ``gamma``; the paper's best
  choice) or ``bce``. ``beta: null`` (default) takes ``beta = (N - 1) / N`` with N the number of
  training samples, the paper's advice: a fixed 0.999 saturates at realistic counts (every label
  of 19,000-105,000 positives gets weight 1.0000), since ``beta**n`` is then 0 for all of them.
  The weights are logged once.

Every option takes ``interval: {low, high, weight, on}`` (runner/losses/interval.py), an extra
squared-hinge term that keeps the logits (or probabilities) in a range; null (default) for none.
A label with no positive training example gets a neutral weight, with a warning naming it: 1 as
pos_weight; the mean of the other labels' weights (before scaling) for ``bce_inverse_freq`` and
``class_balanced`` (counting it as one positive would give it N - 1, or almost all of the weight).
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runner.errors import UserError
from runner.losses.interval import IntervalPenalty, interval_from_config

log = logging.getLogger("runner")


def _positives(pos_counts: list[int] | Tensor, label_names: list[str] | None, loss: str) -> tuple[Tensor, Tensor]:
    """(positives per label as float64, mask of the labels without any), warning once about those."""
    pos = torch.as_tensor(pos_counts, dtype=torch.float64)
    empty = pos == 0
    if empty.any():
        names = [label_names[i] if label_names else f"#{i}" for i in empty.nonzero().flatten().tolist()]
        log.warning("%s: label%s %s ha%s no positive training example; given a neutral weight", loss,
                    "s" if len(names) > 1 else "", ", ".join(names), "ve" if len(names) > 1 else "s")
    return pos, empty


def _neutral_where(empty: Tensor, weights: Tensor) -> Tensor:
    """The weights, with the labels in ``empty`` set to the mean of the others (1 if none is left)."""
    if not empty.any():
        return weights
    neutral = weights[~empty].mean() if (~empty).any() else torch.tensor(1.0, dtype=weights.dtype)
    return torch.where(empty, neutral, weights)


def _sum_to_count(weights: Tensor) -> Tensor:
    return (weights * len(weights) / weights.sum()).to(torch.float32)


def pos_weight_from_counts(pos_counts: list[int] | Tensor, num_samples: int,
                           label_names: list[str] | None = None) -> Tensor:
    """negatives / positives per label, e.g. [19000, 65000, 38000, 105000] of 224000 ->
    [10.79, 2.45, 4.89, 1.13] (4.8947: the 4.90 sometimes quoted is rounded twice); 1 for a
    label with no positive."""
    pos, empty = _positives(pos_counts, label_names, "bce_pos_weight")
    weights = (num_samples - pos) / pos.clamp_min(1)
    return torch.where(empty, torch.ones_like(weights), weights).to(torch.float32)


def inverse_frequency_weights(pos_counts: list[int] | Tensor, num_samples: int,
                              label_names: list[str] | None = None) -> Tensor:
    """``N / n_l`` per label (the others' mean for a label with no positive), scaled to sum to L."""
    pos, empty = _positives(pos_counts, label_names, "bce_inverse_freq")
    return _sum_to_count(_neutral_where(empty, num_samples / pos.clamp_min(1)))


def effective_number_beta(num_samples: int) -> float:
    """Cui et al.'s advice for beta: (N - 1) / N, with N the number of training samples."""
    return (num_samples - 1) / num_samples if num_samples > 1 else 0.0


def class_balanced_weights(pos_counts: list[int] | Tensor, beta: float,
                           label_names: list[str] | None = None) -> Tensor:
    """``(1 - beta) / (1 - beta**n_l)`` per label (Cui et al. 2019; the others' mean for a label
    with no positive), scaled to sum to L."""
    if not 0 <= beta < 1:
        raise UserError(f"loss.beta={beta} must lie in [0, 1)")
    pos, empty = _positives(pos_counts, label_names, "class_balanced")
    # 1 - beta**n as -expm1(n * log(beta)): exact where beta is within 1e-6 of 1.
    effective = -torch.expm1(pos.clamp_min(1) * math.log(beta)) if beta > 0 else torch.ones_like(pos)
    return _sum_to_count(_neutral_where(empty, (1 - beta) / effective))


class MultiLabelLoss(nn.Module, ABC):
    """Per-label terms [B, L] (``elementwise``), optionally weighted per label, averaged over the
    labels, plus the optional interval penalty. Weights are buffers: they follow ``.to(device)``."""

    def __init__(self, label_weight: Tensor | None = None, interval: IntervalPenalty | None = None) -> None:
        super().__init__()
        self.register_buffer("label_weight", label_weight)
        self.interval = interval

    @abstractmethod
    def elementwise(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-label loss terms [B, L]."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = logits.float(), targets.float()
        loss = self.elementwise(logits, targets)
        if self.label_weight is not None:
            loss = loss * self.label_weight
        loss = loss.mean(1)
        if self.interval is not None:
            loss = loss + self.interval(logits)
        return loss


class BCELoss(MultiLabelLoss):
    def __init__(self, pos_weight: Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("pos_weight", pos_weight)

    def elementwise(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")


class FocalLoss(MultiLabelLoss):
    def __init__(self, gamma: float = 2.0, alpha: float | Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gamma = float(gamma)
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def elementwise(self, logits: Tensor, targets: Tensor) -> Tensor:
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        signed = logits * (2 * targets - 1)  # z: the logit of the true class
        loss = torch.exp(self.gamma * F.logsigmoid(-signed)) * ce  # (1 - p_t)**gamma * ce
        if self.alpha is not None:
            loss = (self.alpha * targets + (1 - self.alpha) * (1 - targets)) * loss
        return loss


class AsymmetricLoss(MultiLabelLoss):
    def __init__(self, gamma_neg: float, gamma_pos: float, clip: float, eps: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gamma_neg, self.gamma_pos = float(gamma_neg), float(gamma_pos)
        self.clip, self.eps = float(clip), float(eps)

    def _clamped_log(self, log_prob: Tensor) -> Tensor:
        return log_prob.clamp_min(math.log(self.eps)) if self.eps > 0 else log_prob

    def elementwise(self, logits: Tensor, targets: Tensor) -> Tensor:
        positive = -torch.exp(self.gamma_pos * F.logsigmoid(-logits)) * self._clamped_log(F.logsigmoid(logits))
        if self.clip > 0:
            shifted = (torch.sigmoid(logits) - self.clip).clamp_min(0)  # p_m
            # where(): the weight of a discarded negative is exactly 0 and its gradient finite.
            weight = torch.where(shifted > 0, shifted.clamp_min(1e-30) ** self.gamma_neg, 0.0)
            log_not = self._clamped_log(torch.log1p(-shifted))
        else:
            weight = torch.exp(self.gamma_neg * F.logsigmoid(logits))
            log_not = self._clamped_log(F.logsigmoid(-logits))
        negative = -weight * log_not
        return targets * positive + (1 - targets) * negative


# Builders: the config options. pos_counts and num_samples are supplied by the family.

def bce(interval: dict | None = None) -> MultiLabelLoss:
    return BCELoss(interval=interval_from_config(interval))


def bce_pos_weight(pos_counts: list, num_samples: int, interval: dict | None = None,
                   label_names: list | None = None) -> MultiLabelLoss:
    weights = pos_weight_from_counts(pos_counts, num_samples, label_names)
    return BCELoss(pos_weight=weights, interval=interval_from_config(interval))


def bce_inverse_freq(pos_counts: list, num_samples: int, interval: dict | None = None,
                     label_names: list | None = None) -> MultiLabelLoss:
    weights = inverse_frequency_weights(pos_counts, num_samples, label_names)
    return BCELoss(label_weight=weights, interval=interval_from_config(interval))


def _check_alpha(alpha: float | list | None, num_labels: int | None) -> None:
    values = alpha if isinstance(alpha, (list, tuple)) else [] if alpha is None else [alpha]
    if not all(0 <= float(a) <= 1 for a in values):
        raise UserError(f"loss.alpha={alpha} must lie in [0, 1] (or be null for no alpha weighting)")
    if isinstance(alpha, (list, tuple)) and num_labels is not None and len(alpha) != num_labels:
        raise UserError(f"loss.alpha has {len(alpha)} values; the dataset has {num_labels} labels")


def focal(
    gamma: float = 2.0,
    alpha: float | list[float] | None = None,
    interval: dict | None = None,
    pos_counts: list | None = None,
) -> MultiLabelLoss:
    if gamma < 0:
        raise UserError(f"loss.gamma={gamma} must be >= 0")
    _check_alpha(alpha, None if pos_counts is None else len(pos_counts))
    return FocalLoss(gamma=gamma, alpha=alpha, interval=interval_from_config(interval))


def asl(
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    interval: dict | None = None,
) -> MultiLabelLoss:
    if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1 or not 0 <= eps < 1:
        raise UserError(
            f"loss: need gamma_neg, gamma_pos >= 0 and clip, eps in [0, 1); got gamma_neg={gamma_neg}, "
            f"gamma_pos={gamma_pos}, clip={clip}, eps={eps}"
        )
    return AsymmetricLoss(gamma_neg, gamma_pos, clip, eps, interval=interval_from_config(interval))


def class_balanced(
    pos_counts: list,
    beta: float | None = None,
    base: str = "focal",
    gamma: float = 2.0,
    interval: dict | None = None,
    num_samples: int | None = None,
    label_names: list | None = None,
) -> MultiLabelLoss:
    if base not in ("focal", "bce"):
        raise UserError(f"loss.base={base!r} is not known; allowed: focal, bce")
    if beta is None:
        if num_samples is None:
            raise UserError("loss.beta=null takes beta = (N - 1) / N from the number of training samples N, "
                            "which this caller did not supply: set loss.beta (e.g. 0.9999)")
        beta = effective_number_beta(num_samples)
    weights = class_balanced_weights(pos_counts, beta, label_names)
    names = label_names or [f"#{i}" for i in range(len(weights))]
    log.info("class_balanced: beta=%.8g, label weights %s", beta,
             ", ".join(f"{name} {w:.4g}" for name, w in zip(names, weights.tolist())))
    penalty = interval_from_config(interval)
    if base == "focal":
        if gamma < 0:
            raise UserError(f"loss.gamma={gamma} must be >= 0")
        return FocalLoss(gamma=gamma, label_weight=weights, interval=penalty)
    return BCELoss(label_weight=weights, interval=penalty)

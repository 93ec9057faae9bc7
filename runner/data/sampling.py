"""Multi-label oversampling: per-image weights for the engine's WeightedRandomSampler; and the
DataBundle every multi-label dataset returns (its info and weights come from the training labels).

``balanced``: each image is weighted by the inverse frequency of the *rarest* positive label it
carries, so an image with a rare label is drawn as often as that label needs, and images with
several labels are kept whole (no label is dropped from an image). Images with no positive label
form their own group: they get the inverse of the fraction of images with no positive label, as
if "no label" were one more label. Weights are scaled to mean 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runner.engine.family import DataBundle
from runner.errors import UserError

SAMPLERS = ("none", "balanced")


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise UserError(f"dataset.sampler={sampler!r} is not known; allowed: {', '.join(SAMPLERS)}")
    return sampler


def rarest_label_weights(labels: Tensor) -> Tensor:
    """Per-image weight [N] from 0/1 labels [N, L]; see the module docstring."""
    labels = labels.to(torch.float64)
    n = labels.shape[0]
    label_freq = labels.mean(0)  # [L]
    inverse = torch.where(label_freq > 0, 1.0 / label_freq.clamp_min(1.0 / n), torch.zeros_like(label_freq))
    # The rarest positive label has the largest inverse frequency.
    weights = (labels * inverse).amax(1)
    no_positive = labels.sum(1) == 0
    if no_positive.any():
        weights[no_positive] = n / no_positive.sum()
    return (weights / weights.mean()).to(torch.float32)


def train_weights(sampler: str, labels: Tensor) -> Tensor | None:
    """The ``DataBundle.train_weights`` for ``dataset.sampler`` (None: plain shuffling)."""
    return rarest_label_weights(labels) if check_sampler(sampler) == "balanced" else None


def multilabel_bundle(train, val, test, label_names: list[str], train_labels: Tensor, sampler: str,
                      predict=None) -> DataBundle:
    """The multi-label family's bundle: label names, the training labels (the losses compute their
    weights from them) and, for ``sampler=balanced``, the per-image sampling weights."""
    return DataBundle(
        family="multilabel", train=train, val=val, test=test,
        info={"num_labels": len(label_names), "label_names": list(label_names), "train_labels": train_labels,
              "prevalence": train_labels.mean(0).tolist()},
        train_weights=train_weights(sampler, train_labels), predict=predict,
    )

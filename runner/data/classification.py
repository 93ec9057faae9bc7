"""What every single-label classification dataset shares: the DataBundle it returns and the
seeded, stratified cut of a validation split from the training split."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from runner.engine.family import DataBundle
from runner.errors import UserError


def classification_bundle(train: Dataset, val: Dataset | None, test: Dataset | None, class_names: list[str],
                          train_labels: Tensor, channels: int, image_size: int,
                          predict: Dataset | None = None) -> DataBundle:
    """The classification family's bundle. ``info``: ``num_classes``, ``class_names``,
    ``channels`` and ``image_size`` of the items, and ``class_counts`` (training samples per
    class, from which the class-weighted losses take their weights)."""
    counts = torch.bincount(train_labels.long(), minlength=len(class_names))
    return DataBundle(
        family="classification", train=train, val=val, test=test,
        info={"num_classes": len(class_names), "class_names": [str(c) for c in class_names], "channels": channels,
              "image_size": image_size, "class_counts": [int(c) for c in counts.tolist()]},
        predict=predict,
    )


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, val indices): ``round(fraction * n_c)`` samples of each class c go to val,
    drawn from a generator seeded by ``seed``, so every class keeps its share in both splits (a
    class with one sample stays in train). Indices are sorted."""
    if not 0 < fraction < 1:
        raise UserError(f"dataset.val_fraction={fraction} must lie strictly between 0 and 1")
    generator = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        take = min(round(fraction * len(members)), len(members) - 1)
        val.append(members[torch.randperm(len(members), generator=generator)[:take]])
    val_idx = torch.cat(val).sort().values if val else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx

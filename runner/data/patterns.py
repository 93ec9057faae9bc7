"""``patterns``: an embedded, procedural 10-class image set (no files, made in about a second).

Each 28x28 grey image holds one bright figure on a darker, noisy background; the class is the
figure:

    0 horizontal_stripes  1 vertical_stripes  2 diagonal_stripes  3 checkerboard  4 disc
    5 ring                6 square            7 frame             8 plus          9 triangle

Stripes and the checkerboard fill a square window; every figure has a random centre, size
(radius 5-10 px), brightness and background level, and stripes a random period (3-6 px) and
phase, and Gaussian pixel noise is added, so neither brightness nor position tells the class.
Classes are drawn uniformly. The set is generated with torch, vectorised, from ``seed``; each
split has its own generator, so changing ``n_train`` leaves the val and test images unchanged.
Items are (image [1, 28, 28] normalised, class index); the splits are TensorDatasets, so
``trainer.data_on_device=true`` works.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from runner.data.classification import classification_bundle
from runner.engine.family import DataBundle
from runner.errors import UserError

CLASS_NAMES = ["horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "disc", "ring",
               "square", "frame", "plus", "triangle"]
SIDE = 28
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_MEAN, _STD = 0.26, 0.24  # pixel statistics, measured once on the default training split


def _masks(label: int, ys: Tensor, xs: Tensor, cy: Tensor, cx: Tensor, r: Tensor, period: Tensor,
           phase: Tensor) -> Tensor:
    """Boolean figure masks [n, S, S] of one class; parameters are [n, 1, 1]."""
    dy, dx = ys - cy, xs - cx
    box = (dx.abs() <= r) & (dy.abs() <= r)
    dist2 = dx**2 + dy**2
    on = lambda coordinate: torch.remainder(coordinate + phase, period) < period / 2  # noqa: E731
    if label == 0:
        return box & on(ys)
    if label == 1:
        return box & on(xs)
    if label == 2:
        return box & on((xs + ys) / 1.4142)
    if label == 3:
        return box & (on(xs) ^ on(ys))
    if label == 4:
        return dist2 <= r**2
    if label == 5:
        return (dist2 <= r**2) & (dist2 >= (r - 2.5) ** 2)
    if label == 6:
        return box
    if label == 7:
        return box & ~((dx.abs() <= r - 2.5) & (dy.abs() <= r - 2.5))
    if label == 8:
        arm = r / 4 + 0.5
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    return (dy.abs() <= r) & (2 * dx.abs() <= dy + r)  # triangle, apex up


def make_patterns(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(images [n, 1, 28, 28] normalised, labels [n] int64)."""
    labels = torch.randint(0, len(CLASS_NAMES), (n,), generator=generator)
    param = lambda low, high: low + (high - low) * torch.rand(n, 1, 1, generator=generator)  # noqa: E731
    r = param(4, 10)
    cy, cx = param(0, 1) * (SIDE - 1 - 2 * r) + r, param(0, 1) * (SIDE - 1 - 2 * r) + r
    period, phase = param(3, 6), param(0, 6)
    background = param(0.0, 0.4)
    foreground = background + param(0.15, 0.6)
    grid = torch.arange(SIDE, dtype=torch.float32)
    ys, xs = grid.view(1, SIDE, 1), grid.view(1, 1, SIDE)
    masks = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    for label in range(len(CLASS_NAMES)):
        idx = (labels == label).nonzero().flatten()
        if len(idx):
            masks[idx] = _masks(label, ys, xs, cy[idx], cx[idx], r[idx], period[idx], phase[idx])
    images = torch.where(masks, foreground, background)
    # A grey distractor disc in half the images: "something bright somewhere" is not the class.
    dr, dcy, dcx = param(2, 4), param(0, SIDE), param(0, SIDE)
    blob = (torch.rand(n, 1, 1, generator=generator) < 0.5) & ((ys - dcy) ** 2 + (xs - dcx) ** 2 <= dr**2)
    images = torch.where(blob, background + param(0.1, 0.5), images)
    images = images + 0.15 * torch.randn(n, SIDE, SIDE, generator=generator)
    return ((images.unsqueeze(1) - _MEAN) / _STD).contiguous(), labels


def build(n_train: int = 6000, n_val: int = 1000, n_test: int = 2000, seed: int = 0) -> DataBundle:
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 1:
            raise UserError(f"dataset.{key}={n} must be at least 1")
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        generator = torch.Generator().manual_seed(1000 * seed + _SPLIT_IDS[split])
        splits[split] = TensorDataset(*make_patterns(n, generator))
    return classification_bundle(splits["train"], splits["val"], splits["test"], CLASS_NAMES,
                                 splits["train"].tensors[1], channels=1, image_size=SIDE)

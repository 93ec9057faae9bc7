"""``shapes``: an embedded, procedural multi-label image set (no download, made in a second).

Each image is a noisy dark background with up to four coloured shapes at random positions and
sizes. Label ``l`` is the presence of shape ``l`` in its own colour:

    0 red_square   1 green_disc   2 blue_triangle   3 yellow_cross

Labels are drawn independently with the requested prevalences (default 8%, 29%, 17%, 47%: the
practitioners' case). Grey distractor blobs are added so that "something bright" is not enough,
and a later shape may partly cover an earlier one. The whole set is generated with torch,
vectorised, from ``seed``; each split has its own generator, so changing ``n_train`` leaves the
val and test images unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from runner.data.sampling import check_sampler, multilabel_bundle
from runner.engine.family import DataBundle
from runner.errors import UserError

LABEL_NAMES = ["red_square", "green_disc", "blue_triangle", "yellow_cross"]
_COLOURS = torch.tensor([[0.9, 0.15, 0.15], [0.15, 0.85, 0.2], [0.2, 0.35, 0.95], [0.9, 0.85, 0.1]])
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Normalisation of the pixel values (mean and std measured once on the default training split).
_MEAN, _STD = 0.09, 0.175


def _shape_masks(ys: Tensor, xs: Tensor, cy: Tensor, cx: Tensor, r: Tensor) -> Tensor:
    """Boolean masks [N, 4, H, W] of the four shapes; centres and radii are [N, 4, 1, 1]."""
    dy, dx = ys - cy, xs - cx
    square = (dx.abs() <= r) & (dy.abs() <= r)
    disc = dx**2 + dy**2 <= r**2
    triangle = (dy.abs() <= r) & (2 * dx.abs() <= dy + r)  # apex up, base at the bottom
    arm = r / 3
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    return torch.stack([square[:, 0], disc[:, 1], triangle[:, 2], cross[:, 3]], 1)


def make_shapes(n: int, image_size: int, prevalences: list[float], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(images [n, 3, S, S] normalised, labels [n, 4] in {0, 1})."""
    size = image_size
    labels = (torch.rand(n, 4, generator=generator) < torch.tensor(prevalences)).float()
    scale = size / 32
    r = (3 + 3 * torch.rand(n, 4, 1, 1, generator=generator)) * scale
    cy = r + (size - 1 - 2 * r) * torch.rand(n, 4, 1, 1, generator=generator)
    cx = r + (size - 1 - 2 * r) * torch.rand(n, 4, 1, 1, generator=generator)
    grid = torch.arange(size, dtype=torch.float32)
    masks = _shape_masks(grid.view(1, 1, size, 1), grid.view(1, 1, 1, size), cy, cx, r)
    masks &= labels.bool().view(n, 4, 1, 1)

    images = 0.1 * torch.rand(n, 1, 1, 1, generator=generator).expand(n, 3, size, size).clone()
    # Two grey distractor discs per image, each present with probability one half.
    for _ in range(2):
        dr = (2 + 3 * torch.rand(n, 1, 1, generator=generator)) * scale
        dcy, dcx = (size * torch.rand(n, 2, 1, 1, generator=generator)).unbind(1)
        grey = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
        on = (torch.rand(n, 1, 1, generator=generator) < 0.5)
        blob = on & ((grid.view(1, size, 1) - dcy) ** 2 + (grid.view(1, 1, size) - dcx) ** 2 <= dr**2)
        images = torch.where(blob.unsqueeze(1), grey, images)
    jitter = 0.1 * (torch.rand(n, 4, 3, generator=generator) - 0.5)
    colours = (_COLOURS + jitter).clamp(0, 1)  # [n, 4, 3]
    for label in range(4):
        images = torch.where(masks[:, label].unsqueeze(1), colours[:, label].view(n, 3, 1, 1), images)
    images = images + 0.08 * torch.randn(images.shape, generator=generator)
    return ((images - _MEAN) / _STD).contiguous(), labels


def build(
    n_train: int = 3000,
    n_val: int = 800,
    n_test: int = 800,
    image_size: int = 32,
    prevalences: list[float] = (0.08, 0.29, 0.17, 0.47),
    seed: int = 0,
    sampler: str = "none",
) -> DataBundle:
    check_sampler(sampler)
    prevalences = [float(p) for p in prevalences]
    if len(prevalences) != 4 or not all(0 < p < 1 for p in prevalences):
        raise UserError(f"dataset.prevalences={prevalences} must be 4 numbers strictly between 0 and 1")
    if image_size < 16:
        raise UserError(f"dataset.image_size={image_size} is too small for the shapes; use 16 or more")
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 1:
            raise UserError(f"dataset.{key}={n} must be at least 1")
    splits = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        generator = torch.Generator().manual_seed(1000 * seed + _SPLIT_IDS[split])
        splits[split] = make_shapes(n, image_size, prevalences, generator)
    train_labels = splits["train"][1]
    return multilabel_bundle(TensorDataset(*splits["train"]), TensorDataset(*splits["val"]),
                             TensorDataset(*splits["test"]), list(LABEL_NAMES), train_labels, sampler)

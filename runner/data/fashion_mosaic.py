"""``fashion_mosaic``: real images for the multi-label family, built from Fashion-MNIST.

Each image is a 2x2 mosaic (56x56 px, grey repeated on 3 channels, resized to ``image_size``) of
four Fashion-MNIST items. Each cell's class is drawn independently with the probabilities below;
the item is a random image of that class. The four labels are "the mosaic contains an item of
group g":

    label      classes (Fashion-MNIST ids)              per-cell prob.  prevalence 1-(1-q)^4
    bag        Bag (8)                                  0.0127          5%
    trouser    Trouser (1)                              0.0398          15%
    dress      Dress (3)                                0.0853          30%
    footwear   Sandal (5), Sneaker (7), Ankle boot (9)  0.1591          50%

The remaining mass (0.703) is shared by the four unlabelled classes T-shirt/top (0), Pullover (2),
Coat (4) and Shirt (6): distractors that look like dresses and bags in places.
Measured on the default splits (seed 0; bag / trouser / dress / footwear): train 4.9% / 15.2% /
29.6% / 50.3%, val 4.3% / 15.2% / 29.6% / 50.6%, test 4.3% / 15.9% / 29.0% / 49.7%; 24% of the
training mosaics carry no label.

Train and val mosaics use disjoint pools of the IDX training images (val takes the last
``val_pool`` of them); test mosaics use the t10k images. Everything is drawn from ``seed``.
Files: ``train-images-idx3-ubyte(.gz)`` etc. under ``root`` (Debian:
``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from runner.data.idx import find_idx, read_idx
from runner.data.sampling import check_sampler, multilabel_bundle
from runner.engine.family import DataBundle
from runner.errors import UserError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
LABEL_NAMES = ["bag", "trouser", "dress", "footwear"]
LABEL_CLASSES = [[8], [1], [3], [5, 7, 9]]
PREVALENCES = [0.05, 0.15, 0.30, 0.50]
DISTRACTOR_CLASSES = [0, 2, 4, 6]
_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics (also those of the mosaics)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def cell_class_probabilities() -> Tensor:
    """Probability of each of the 10 classes in one cell, giving the documented prevalences."""
    probs = torch.zeros(10, dtype=torch.float64)
    for classes, prevalence in zip(LABEL_CLASSES, PREVALENCES):
        probs[classes] = (1 - (1 - prevalence) ** 0.25) / len(classes)
    probs[DISTRACTOR_CLASSES] = (1 - probs.sum()) / len(DISTRACTOR_CLASSES)
    return probs


class MosaicDataset(Dataset):
    """uint8 mosaics [N, S, S] and labels [N, L]; items are normalised [3, S, S] float images."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image = (self.images[i].float() / 255 - _MEAN) / _STD
        return image.expand(3, -1, -1), self.labels[i]


def make_mosaics(
    images: Tensor, classes: Tensor, n: int, image_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(uint8 mosaics [n, S, S], labels [n, 4]) from a pool of 28x28 images and their classes."""
    draws = torch.multinomial(cell_class_probabilities(), 4 * n, replacement=True, generator=generator)
    cell_classes = draws.view(n, 4)
    # Pick a random pool image of each cell's class: pool sorted by class, offset within the class.
    order = torch.argsort(classes, stable=True)
    per_class = torch.bincount(classes, minlength=10)
    start = torch.cumsum(per_class, 0) - per_class
    offset = (torch.rand(n, 4, generator=generator) * per_class[cell_classes]).long()
    items = images[order[start[cell_classes] + offset]]  # [n, 4, 28, 28]
    top = torch.cat([items[:, 0], items[:, 1]], dim=2)
    bottom = torch.cat([items[:, 2], items[:, 3]], dim=2)
    mosaics = torch.cat([top, bottom], dim=1)  # [n, 56, 56]
    if image_size != mosaics.shape[-1]:
        resized = [
            F.interpolate(chunk.unsqueeze(1).float(), size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8).squeeze(1)
            for chunk in mosaics.split(2048)
        ]
        mosaics = torch.cat(resized)
    labels = torch.stack([torch.isin(cell_classes, torch.tensor(g)).any(1) for g in LABEL_CLASSES], 1).float()
    return mosaics.contiguous(), labels


def _read_split(root: Path, prefix: str) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(read_idx(find_idx(root, f"{prefix}-images-idx3-ubyte")).copy())
    classes = torch.from_numpy(read_idx(find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype("int64"))
    return images, classes


def build(
    root: str = DEFAULT_ROOT,
    n_train: int = 20000,
    n_val: int = 4000,
    n_test: int = 4000,
    image_size: int = 56,
    val_pool: int = 10000,
    seed: int = 0,
    sampler: str = "none",
) -> DataBundle:
    check_sampler(sampler)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"dataset.root={root!r} does not exist; get Fashion-MNIST with `{INSTALL_HINT}` "
                        f"(files go to {DEFAULT_ROOT}) or point dataset.root at the IDX files")
    for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("image_size", image_size)):
        if n < 1:
            raise UserError(f"dataset.{key}={n} must be at least 1")
    try:
        train_images, train_classes = _read_split(path, "train")
        test_images, test_classes = _read_split(path, "t10k")
    except UserError as e:
        raise UserError(f"{e}; install with `{INSTALL_HINT}`") from None
    if not 0 < val_pool < len(train_images):
        raise UserError(f"dataset.val_pool={val_pool} must lie between 1 and {len(train_images) - 1}")
    pools = {
        "train": (train_images[:-val_pool], train_classes[:-val_pool], n_train),
        "val": (train_images[-val_pool:], train_classes[-val_pool:], n_val),
        "test": (test_images, test_classes, n_test),
    }
    splits = {}
    for split, (images, classes, n) in pools.items():
        generator = torch.Generator().manual_seed(1000 * seed + _SPLIT_IDS[split])
        splits[split] = MosaicDataset(*make_mosaics(images, classes, n, image_size, generator))
    train_labels = splits["train"].labels
    return multilabel_bundle(splits["train"], splits["val"], splits["test"], list(LABEL_NAMES), train_labels, sampler)

"""MNIST and Fashion-MNIST as 10-class classification sets (``dataset=mnist_classes``,
``dataset=fashion_mnist_classes``), read from their IDX files (plain or .gz) in ``root``.

Items are (grey image [1, 28, 28] normalised with the set's pixel mean and std, class index).
The validation split is ``n_val`` training images drawn at random from a generator seeded by
``seed`` (0: no validation split); the t10k files are the test split. The splits are
TensorDatasets, so ``trainer.data_on_device=true`` keeps them on the GPU — except a training
split with ``train_transforms`` (per-sample augmentation of the 8-bit image, e.g. Fashion-MNIST's
RandomCrop(28, padding=4) + RandomHorizontalFlip; runner/data/transforms.py), which is made
item by item in the DataLoader workers. Nothing is downloaded unless ``download=true``
(torchvision then fetches the files into ``root``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from runner.data.classification import classification_bundle
from runner.data.transforms import Transforms, check_first, fit_size, item_key, without_augmentation
from runner.data.idx import find_idx, read_idx
from runner.engine.family import DataBundle
from runner.errors import UserError

SIDE = 28
MNIST_NAMES = [str(d) for d in range(10)]
# torchvision's FashionMNIST.classes, in snake case so that they read well in metric names.
FASHION_NAMES = ["t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle_boot"]
MNIST_STATS = (0.1307, 0.3081)
FASHION_STATS = (0.2860, 0.3530)


def _from_idx(root: str, prefix: str) -> tuple[Tensor, Tensor]:
    """(uint8 images [N, 28, 28], labels [N]) of ``train`` or ``t10k``."""
    images = read_idx(find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise UserError(f"{prefix}-images-idx3-ubyte in dataset.root={root} holds images of shape "
                        f"{images.shape[1:]}, expected (28, 28)")
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{prefix}-labels-idx1-ubyte in dataset.root={root} does not hold one class 0-9 "
                        f"per image ({len(images)} images)")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class AugmentedImages(Dataset):
    """The training split with transforms: 8-bit images [N, 1, 28, 28] kept as they are, each
    item transformed under its seed, brought back to 28 px if the transforms changed the size,
    then normalised (unless the transforms made it float)."""

    seeded_items = True

    def __init__(self, images: Tensor, labels: Tensor, transforms: Transforms, stats: tuple[float, float]) -> None:
        self.images, self.labels, self.transforms, self.stats = images, labels, transforms, stats

    def without_augmentation(self) -> "AugmentedImages":
        return without_augmentation(self, "transforms")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: object) -> tuple[Tensor, Tensor]:
        index, seed = item_key(key)
        image = fit_size(self.transforms(self.images[index], seed), SIDE)
        if image.dtype == torch.uint8:
            mean, std = self.stats
            image = (image.float() / 255 - mean) / std
        return image, self.labels[index]


def _load(root: str, download: bool, torchvision_name: str) -> dict[str, tuple[Tensor, Tensor]]:
    if download:
        import torchvision

        cls = getattr(torchvision.datasets, torchvision_name)
        sets = {"train": cls(root, train=True, download=True), "test": cls(root, train=False, download=True)}
        return {split: (s.data, s.targets.long()) for split, s in sets.items()}
    if not Path(root).expanduser().is_dir():
        raise UserError(f"dataset.root={root} is not a folder; point it at the IDX files "
                        "or set dataset.download=true to fetch them with torchvision")
    return {"train": _from_idx(root, "train"), "test": _from_idx(root, "t10k")}


def _bundle(root: str, n_val: int, seed: int, download: bool, torchvision_name: str, names: list[str],
            stats: tuple[float, float], train_transforms: list | None) -> DataBundle:
    transforms = Transforms(train_transforms, "train_transforms")
    splits = _load(root, download, torchvision_name)
    images, labels = splits["train"]
    if not 0 <= n_val < len(images):
        raise UserError(f"dataset.n_val={n_val}: must be >= 0 and below the {len(images)} training images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[n_val:].sort().values, "val": order[:n_val].sort().values}
    mean, std = stats

    def dataset(images: Tensor, labels: Tensor) -> TensorDataset:
        return TensorDataset(((images.float() / 255 - mean) / std).unsqueeze(1).contiguous(), labels)

    train_labels = labels[parts["train"]]
    if transforms.active:
        train: Dataset = AugmentedImages(images[parts["train"]].unsqueeze(1).contiguous(), train_labels, transforms,
                                         stats)
        check_first(train)
    else:
        train = dataset(images[parts["train"]], train_labels)
    val = dataset(images[parts["val"]], labels[parts["val"]]) if n_val else None
    test = dataset(*splits["test"])
    return classification_bundle(train, val, test, names, train_labels, channels=1, image_size=SIDE)


def mnist(root: str = "data/mnist", n_val: int = 5000, seed: int = 0, download: bool = False,
          train_transforms: list | None = None) -> DataBundle:
    """MNIST digits, classes "0" to "9"."""
    return _bundle(root, n_val, seed, download, "MNIST", MNIST_NAMES, MNIST_STATS, train_transforms)


def fashion_mnist(root: str = "/usr/share/datasets/fashion-mnist", n_val: int = 5000, seed: int = 0,
                  download: bool = False, train_transforms: list | None = None) -> DataBundle:
    """Fashion-MNIST (Debian's ``dataset-fashion-mnist`` installs the files at the default root)."""
    return _bundle(root, n_val, seed, download, "FashionMNIST", FASHION_NAMES, FASHION_STATS, train_transforms)

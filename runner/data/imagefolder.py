"""``imagefolder``: your images in torchvision's ImageFolder layout, one folder per class.

    <root>/train/<class>/<image>     required; the class names are the folder names, sorted
    <root>/val/<class>/<image>       optional; without it, a seeded, stratified ``val_fraction``
                                     of train is held out (``seed``)
    <root>/test/<class>/<image>      optional; without it, there is no test evaluation

val and test take the class indices of train (a class folder may be missing there; a folder
that train does not have is an error). Images (.jpg, .jpeg, .png, .gif, .webp: what
``torchvision.io.decode_image`` reads) are decoded as RGB (``channels: 3``) or grey
(``channels: 1``), resized to ``image_size`` squared (antialiased) and normalised with the
ImageNet mean and std (their mean for grey), which is what ImageNet-pretrained weights expect.
A file that cannot be decoded stops the run with its path named.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from runner.data.classification import classification_bundle, stratified_split
from runner.engine.family import DataBundle
from runner.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def read_image(path: str, mode: ImageReadMode) -> Tensor:
    try:
        return decode_image(path, mode=mode)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


class ClassFolder(ImageFolder):
    """One split's folder, indexed with the training split's classes."""

    def __init__(self, root: Path, classes: list[str] | None, channels: int, image_size: int) -> None:
        self.fixed_classes = classes
        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])
        transform = v2.Compose([v2.Resize([image_size, image_size], antialias=True),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        super().__init__(str(root), transform=transform, loader=functools.partial(read_image, mode=mode),
                         is_valid_file=has_image_extension, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if self.fixed_classes is None:
            if not found:
                raise UserError(f"{directory} has no class folders: expected {directory}/<class>/<image>")
            return found, {name: i for i, name in enumerate(found)}
        unknown = [name for name in found if name not in self.fixed_classes]
        if unknown:
            raise UserError(f"{directory}: class folder(s) {', '.join(unknown)} are not in the train split; "
                            f"its classes: {', '.join(self.fixed_classes)}")
        return list(self.fixed_classes), {name: i for i, name in enumerate(self.fixed_classes)}


def _split(root: Path, name: str, classes: list[str] | None, channels: int, image_size: int) -> ClassFolder | None:
    folder = root / name
    if not folder.is_dir():
        return None
    split = ClassFolder(folder, classes, channels, image_size)
    if len(split) == 0:
        raise UserError(f"{folder} holds no image ({', '.join(EXTENSIONS)}) in its class folders")
    return split


def build(root: str, image_size: int = 224, channels: int = 3, val_fraction: float = 0.1,
          seed: int = 0) -> DataBundle:
    if root in ("", "???"):
        raise UserError("dataset.root is required: the folder holding train/<class>/<image>, e.g. dataset.root=data/pets")
    if channels not in (1, 3):
        raise UserError(f"dataset.channels={channels}: allowed values are 1 (grey) and 3 (RGB)")
    if image_size < 8:
        raise UserError(f"dataset.image_size={image_size} must be at least 8")
    folder = Path(root).expanduser()
    if not (folder / "train").is_dir():
        raise UserError(f"dataset.root={root} has no train/ folder; expected {root}/train/<class>/<image> "
                        "(and optionally val/ and test/)")
    train_folder = _split(folder, "train", None, channels, image_size)
    classes = train_folder.classes
    train_labels = torch.tensor(train_folder.targets, dtype=torch.long)
    val: Dataset | None = _split(folder, "val", classes, channels, image_size)
    test = _split(folder, "test", classes, channels, image_size)
    train: Dataset = train_folder
    if val is None:
        keep, held_out = stratified_split(train_labels, val_fraction, seed)
        if len(held_out) == 0:
            raise UserError(f"dataset.val_fraction={val_fraction} of {len(train_labels)} training images holds out "
                            "none for validation; raise it or add a val/ folder")
        train, val = Subset(train_folder, keep.tolist()), Subset(train_folder, held_out.tolist())
        train_labels = train_labels[keep]
    return classification_bundle(train, val, test, classes, train_labels, channels=channels, image_size=image_size)

"""``imagefolder``: your images in torchvision's ImageFolder layout, one folder per class.

    <root>/train/<class>/<image>     required; the class names are the folder names, sorted
    <root>/val/<class>/<image>       optional; without it, a seeded, stratified ``val_fraction``
                                     of train is held out (``seed``)
    <root>/test/<class>/<image>      optional; without it, there is no test evaluation

val and test take the class indices of train (a class folder may be missing there; a folder
that train does not have is an error). A class folder of train with no image in it is an error
(it would be a class the model can never learn, silently counted in the outputs); one of val or
test is allowed, as a missing one is, with a warning. Images (.jpg, .jpeg, .png, .gif, .webp: what
``torchvision.io.decode_image`` reads) are decoded as RGB (``channels: 3``) or grey
(``channels: 1``), go through ``train_transforms`` (training split) or ``eval_transforms`` (the
others; runner/data/transforms.py), are resized to ``image_size`` squared (antialiased) where
the transforms left another size, and normalised with the ImageNet mean and std (their mean for
grey), which is what ImageNet-pretrained weights expect. A file that cannot be decoded stops the
run with its path named. ``predict``: a folder of unlabelled images for mode=predict.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import normalize, to_dtype

from runner.data.classification import classification_bundle, stratified_split
from runner.data.transforms import Transforms, check_first, fit_size, item_key, without_augmentation
from runner.data.unlabelled import EXTENSIONS, UnlabelledImages, images_under
from runner.engine.family import DataBundle
from runner.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
log = logging.getLogger(__name__)


def read_image(path: str, mode: ImageReadMode) -> Tensor:
    try:
        return decode_image(path, mode=mode)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None


def has_image_extension(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def model_input(image: Tensor, image_size: int) -> Tensor:
    """A transformed image as the model takes it: ``image_size`` squared and, if still 8-bit,
    normalised with the ImageNet statistics (their mean for grey)."""
    image = fit_size(image, image_size)
    if image.dtype != torch.uint8:  # the transforms normalised it (ToDtype + Normalize)
        return image
    grey = image.shape[0] == 1
    mean, std = ([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]) if grey else (IMAGENET_MEAN, IMAGENET_STD)
    return normalize(to_dtype(image, torch.float32, scale=True), mean, std)


class ClassFolder(ImageFolder):
    """One split's folder, indexed with the training split's classes. Items are (image, class);
    an item key may be ``(index, seed)`` (training with transforms: ``seeded_items``)."""

    def __init__(self, root: Path, classes: list[str] | None, channels: int, image_size: int,
                 transforms: Transforms) -> None:
        # not self.transforms: VisionDataset sets that name in __init__
        self.fixed_classes, self.image_size, self.image_transforms = classes, image_size, transforms
        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        super().__init__(str(root), loader=functools.partial(read_image, mode=mode),
                         is_valid_file=has_image_extension, allow_empty=True)

    @property
    def seeded_items(self) -> bool:
        return self.image_transforms.active

    def without_augmentation(self) -> "ClassFolder":
        return without_augmentation(self, "image_transforms")

    def __getitem__(self, key: Any) -> tuple[Tensor, int]:
        index, seed = item_key(key)
        path, target = self.samples[index]
        return model_input(self.image_transforms(self.loader(path), seed, path), self.image_size), target

    def sample_ids(self) -> list[str]:
        return [path for path, _ in self.samples]

    def part(self, indices: list[int], transforms: Transforms) -> "ClassFolder":
        """The same folder restricted to ``indices`` (a val split held out of train), with its own transforms."""
        part = copy.copy(self)
        part.samples = part.imgs = [self.samples[i] for i in indices]
        part.targets = [target for _, target in part.samples]
        part.image_transforms = transforms
        return part

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


def _split(root: Path, name: str, classes: list[str] | None, channels: int, image_size: int,
           transforms: Transforms) -> ClassFolder | None:
    folder = root / name
    if not folder.is_dir():
        return None
    split = ClassFolder(folder, classes, channels, image_size, transforms)
    if len(split) == 0:
        raise UserError(f"{folder} holds no image ({', '.join(EXTENSIONS)}) in its class folders")
    found = set(split.targets)
    empty = [folder / name for i, name in enumerate(split.classes) if i not in found and (folder / name).is_dir()]
    if empty and classes is None:
        raise UserError(f"{empty[0]} holds no image ({', '.join(EXTENSIONS)}): every class folder of train needs "
                        "images; remove the folder or add its images")
    if empty:
        log.warning("%s holds no image: that class is not evaluated in %s", ", ".join(map(str, empty)), name)
    return split


def _unlabelled_item(path: Path, index: int, mode: ImageReadMode, transforms: Transforms, image_size: int) -> Tensor:
    return model_input(transforms(read_image(str(path), mode), index, path), image_size)


def _predict_split(folder: str, channels: int, image_size: int, transforms: Transforms) -> UnlabelledImages:
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    return UnlabelledImages(images_under(folder), functools.partial(_unlabelled_item, mode=mode, transforms=transforms,
                                                                    image_size=image_size))


def build(root: str, image_size: int = 224, channels: int = 3, val_fraction: float = 0.1, seed: int = 0,
          train_transforms: list | None = None, eval_transforms: list | None = None,
          predict: str | None = None) -> DataBundle:
    train_tf, eval_tf = Transforms(train_transforms, "train_transforms"), Transforms(eval_transforms, "eval_transforms")
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
    train = _split(folder, "train", None, channels, image_size, train_tf)
    classes = train.classes
    train_labels = torch.tensor(train.targets, dtype=torch.long)
    val = _split(folder, "val", classes, channels, image_size, eval_tf)
    test = _split(folder, "test", classes, channels, image_size, eval_tf)
    if val is None:
        keep, held_out = stratified_split(train_labels, val_fraction, seed)
        if len(held_out) == 0:
            raise UserError(f"dataset.val_fraction={val_fraction} of {len(train_labels)} training images holds out "
                            "none for validation; raise it or add a val/ folder")
        train, val = train.part(keep.tolist(), train_tf), train.part(held_out.tolist(), eval_tf)
        train_labels = train_labels[keep]
    unlabelled = _predict_split(predict, channels, image_size, eval_tf) if predict else None
    for split in (train, val, test, unlabelled):  # transforms that cannot work stop here, not in a worker
        if split is not None and (train_tf.active or eval_tf.active):
            check_first(split)
    return classification_bundle(train, val, test, classes, train_labels, channels=channels, image_size=image_size,
                                 predict=unlabelled)

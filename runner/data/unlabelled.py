"""``dataset.predict``: a folder of images without labels, for ``mode=predict``.

Every image file under the folder (any depth; .jpg, .jpeg, .png, .gif, .webp), sorted by path,
goes through the dataset's evaluation pipeline (``prepare``: decode, eval_transforms, resize,
normalise as the dataset does it). Items are images alone; ``sample_ids`` are the file paths
(predictions.csv's ``sample`` column).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from runner.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")


def images_under(folder: str) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.predict={folder}: not a folder; give the folder of images to predict")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(EXTENSIONS))
    if not paths:
        raise UserError(f"dataset.predict={folder} holds no image ({', '.join(EXTENSIONS)})")
    return paths


class UnlabelledImages(Dataset):
    """``prepare(path, index) -> image``; ``finish(batch)``: what the dataset does to a batch
    once it is on the device (the CSV sets normalise 8-bit images there), or None."""

    def __init__(self, paths: list[Path], prepare: Callable[[Path, int], Tensor],
                 finish: Callable[[Tensor], Tensor] | None = None) -> None:
        self.paths, self.prepare, self.finish = paths, prepare, finish

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: Any) -> Tensor:
        return self.prepare(self.paths[int(i)], int(i))

    def sample_ids(self) -> list[str]:
        return [str(p) for p in self.paths]

    def to_device(self, batch: Tensor, device: torch.device) -> Tensor:
        batch = batch.to(device, non_blocking=True)
        return batch if self.finish is None else self.finish(batch)

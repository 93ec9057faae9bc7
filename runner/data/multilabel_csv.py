"""``multilabel_csv``: your own images, listed in a CSV with one 0/1 column per label.

The CSV has an image-path column (``path_column``, relative to ``image_dir`` or absolute) and one
column per label holding 0 or 1, as a pandas ``train_df[CLASSES]`` holds. The splits come either
from three CSVs (``csv`` for train, ``val_csv``, ``test_csv``; val and test may be left out) or
from one CSV with a ``split_column`` whose values are train, val or test.

Everything cheap is checked at start-up, with the CSV file and line named (line 1 is the header):
missing columns, labels that are not 0/1, image files that do not exist, empty splits. A file that
exists but cannot be decoded is reported, with its line, when it is first read. Images are decoded
with torchvision (any format it reads, converted to RGB), resized to ``image_size`` squared and
normalised with the ImageNet mean and std (the statistics DenseNet121's ImageNet weights expect).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import resize

from runner.data.sampling import check_sampler, multilabel_bundle
from runner.engine.family import DataBundle
from runner.errors import UserError

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SPLITS = ("train", "val", "test")


class CSVImages(Dataset):
    """Images decoded on demand; items are (normalised [3, S, S] image, labels [L])."""

    def __init__(self, paths: list[Path], labels: Tensor, lines: list[int], csv: str, image_size: int) -> None:
        self.paths, self.labels, self.lines, self.csv, self.image_size = paths, labels, lines, csv, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.paths[i]
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"{self.csv}, line {self.lines[i]}: cannot read image {path}: {e}") from None
        image = resize(image, [self.image_size, self.image_size], antialias=True)
        return (image.float() / 255 - _MEAN) / _STD, self.labels[i]


def _read_csv(csv: str) -> pd.DataFrame:
    path = Path(csv).expanduser()
    if not path.is_file():
        raise UserError(f"dataset CSV {csv!r}: no such file")
    try:
        return pd.read_csv(path, index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"dataset CSV {csv!r} cannot be parsed: {e}") from None


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, for messages (2, not np.int64(2))."""
    return value.item() if hasattr(value, "item") else value


def _check_columns(frame: pd.DataFrame, csv: str, needed: list[str]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(f"{csv}: missing column(s) {', '.join(map(repr, missing))}; "
                        f"columns present: {', '.join(map(str, frame.columns))}")


def _split_dataset(frame: pd.DataFrame, csv: str, split: str, image_dir: Path, path_column: str,
                   label_columns: list[str], image_size: int) -> CSVImages:
    if len(frame) == 0:
        raise UserError(f"{csv}: the {split} split is empty (no rows)")
    lines = [int(i) + 2 for i in frame.index]  # +1 for the header, +1 because lines count from 1
    values = frame[label_columns]
    bad = ~values.isin([0, 1])
    if bad.to_numpy().any():
        row, col = next(zip(*bad.to_numpy().nonzero()))
        raise UserError(f"{csv}, line {lines[row]}: label {label_columns[col]!r} is {_plain(values.iat[row, col])!r}; "
                        "labels must be 0 or 1")
    paths = []
    for line, name in zip(lines, frame[path_column]):
        if not isinstance(name, str) or not name:
            raise UserError(f"{csv}, line {line}: {path_column!r} is empty")
        path = image_dir / name
        if not path.is_file():
            raise UserError(f"{csv}, line {line}: image file {path} does not exist")
        paths.append(path)
    labels = torch.tensor(values.to_numpy(dtype="float32"))
    return CSVImages(paths, labels, lines, csv, image_size)


def build(
    csv: str,
    image_dir: str,
    val_csv: str | None = None,
    test_csv: str | None = None,
    split_column: str | None = None,
    path_column: str = "path",
    label_columns: list[str] | None = None,
    image_size: int = 224,
    sampler: str = "none",
) -> DataBundle:
    check_sampler(sampler)
    for key, value in (("csv", csv), ("image_dir", image_dir)):
        if value in ("", "???"):
            raise UserError(f"dataset.{key} is required: set it on the command line, e.g. dataset.{key}=...")
    if image_size < 16:
        raise UserError(f"dataset.image_size={image_size} must be at least 16")
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"dataset.image_dir={image_dir!r} is not a folder")
    if split_column is not None and (val_csv or test_csv):
        raise UserError("dataset.split_column takes the splits from dataset.csv: leave val_csv and test_csv null")

    main = _read_csv(csv)
    reserved = [path_column] + ([split_column] if split_column else [])
    if label_columns is None:
        label_columns = [str(c) for c in main.columns if c not in reserved]
    if not label_columns:
        raise UserError(f"{csv}: no label columns (every column besides {', '.join(reserved)} is a label)")
    needed = reserved + list(label_columns)

    frames: dict[str, tuple[pd.DataFrame, str]] = {}
    _check_columns(main, csv, needed)
    if split_column is not None:
        unknown = ~main[split_column].isin(SPLITS)
        if unknown.any():
            i = int(unknown.to_numpy().nonzero()[0][0])
            raise UserError(f"{csv}, line {i + 2}: {split_column}={_plain(main[split_column].iat[i])!r}; "
                            f"allowed: {', '.join(SPLITS)}")
        for split in SPLITS:
            frames[split] = (main[main[split_column] == split], csv)
    else:
        frames["train"] = (main, csv)
        for split, other in (("val", val_csv), ("test", test_csv)):
            if other is not None:
                frame = _read_csv(other)
                _check_columns(frame, other, needed)
                frames[split] = (frame, other)

    datasets = {
        split: _split_dataset(frame, name, split, folder, path_column, list(label_columns), image_size)
        for split, (frame, name) in frames.items()
    }
    train_labels = datasets["train"].labels
    return multilabel_bundle(datasets["train"], datasets.get("val"), datasets.get("test"), list(label_columns),
                             train_labels, sampler)

"""``image_csv``: your images listed in a CSV, with one class per image.

The CSV has an image-path column (``path_column``, relative to ``image_dir`` or absolute) and a
class column (``label_column``) holding class names (``cat``) or class indices (``3``). The splits
come from three CSVs (``csv`` for train, ``val_csv``, ``test_csv``; val and test may be left out)
or from one CSV with a ``split_column`` whose values are train, val or test, as in
``multilabel_csv``.

The classes: ``classes`` (a list of names, in index order) when given; a value must then be one
of the names or an index into the list. Without it, a column of whole numbers holds indices
0..max (named "0", "1", ...), and a column of names gives the sorted names of the training CSV
(a val or test value that train lacks is an error).

Every bad input names the CSV file and its line (line 1 is the header; blank lines count): a
missing column, an empty or unknown class, an image file that does not exist (checked at
start-up), a file that cannot be decoded (when first read). Images are decoded, transformed
(``train_transforms``, ``eval_transforms``), resized and ImageNet-normalised as ``multilabel_csv``
does it (``decode``: cpu | device | auto; RGB). ``predict``: a folder of unlabelled images for
mode=predict.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from runner.data.classification import classification_bundle
from runner.data.multilabel_csv import (DECODES, SPLITS, WORKERS_TO_DECODE, CSVImages, check_transforms,
                                        predict_split, read_csv)
from runner.data.transforms import Transforms
from runner.engine.family import DataBundle
from runner.errors import UserError


def check_columns(frame: pd.DataFrame, csv: str, needed: list[str]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(f"{csv}, line 1 (header): no column {', '.join(map(repr, missing))}; "
                        f"columns present: {', '.join(map(str, frame.columns))}")


def line_of(frame: pd.DataFrame, position: int) -> int:
    return int(frame.index[position]) + 2  # +1 for the header, +1 because lines count from 1


def _is_index(value: object) -> bool:
    """A whole number >= 0 (as pandas reads 3 or 3.0), or its text."""
    if isinstance(value, str):
        return value.strip().isdigit()
    try:
        return float(value) >= 0 and float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _class_names(frames: dict[str, tuple[pd.DataFrame, str]], label_column: str, classes: list[str] | None) -> list[str]:
    if classes is not None:
        if not classes or len(set(map(str, classes))) != len(classes):
            raise UserError(f"dataset.classes={list(classes)} must be a non-empty list of distinct names")
        return [str(c) for c in classes]
    values = [v for frame, _ in frames.values() for v in frame[label_column]]
    if all(_is_index(v) for v in values):
        return [str(i) for i in range(max(int(float(v)) for v in values) + 1)]
    return sorted({str(v).strip() for v in frames["train"][0][label_column]})


def _check_filled(frame: pd.DataFrame, csv: str, label_column: str) -> None:
    for position, value in enumerate(frame[label_column]):
        if pd.isna(value) or str(value).strip() == "":
            raise UserError(f"{csv}, line {line_of(frame, position)}: {label_column!r} is empty; every image needs a class")


def _labels(frame: pd.DataFrame, csv: str, label_column: str, names: list[str], by_name: bool,
            by_index: bool) -> torch.Tensor:
    """Class indices [N] of the rows; ``by_name`` / ``by_index``: which kinds of value are allowed."""
    index_of = {name: i for i, name in enumerate(names)}
    labels = []
    for position, value in enumerate(frame[label_column]):
        text = str(value).strip()
        if by_name and text in index_of:
            labels.append(index_of[text])
        elif by_index and _is_index(value) and int(float(value)) < len(names):
            labels.append(int(float(value)))
        else:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            also = f" (or an index 0-{len(names) - 1})" if by_name and by_index else ""
            where = "" if by_index or not by_name else " of the training CSV"
            raise UserError(f"{csv}, line {line_of(frame, position)}: class {text!r} is not known; "
                            f"classes{where}: {shown}{also}")
    return torch.tensor(labels, dtype=torch.long)


def _paths(frame: pd.DataFrame, csv: str, image_dir: Path, path_column: str) -> list[Path]:
    paths = []
    for position, name in enumerate(frame[path_column]):
        line = line_of(frame, position)
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{csv}, line {line}: {path_column!r} is empty")
        path = image_dir / name.strip()
        if not path.is_file():
            raise UserError(f"{csv}, line {line}: image file {path} does not exist")
        paths.append(path)
    return paths


def build(
    csv: str,
    image_dir: str,
    val_csv: str | None = None,
    test_csv: str | None = None,
    split_column: str | None = None,
    path_column: str = "path",
    label_column: str = "label",
    classes: list[str] | None = None,
    image_size: int = 224,
    decode: str = "auto",
    train_transforms: list | None = None,
    eval_transforms: list | None = None,
    predict: str | None = None,
    device: torch.device | None = None,
    num_workers: int = 0,
) -> DataBundle:
    """``device`` and ``num_workers`` (the run's, supplied by the engine) settle ``decode=auto``."""
    train_tf, eval_tf = Transforms(train_transforms, "train_transforms"), Transforms(eval_transforms, "eval_transforms")
    for key, value in (("csv", csv), ("image_dir", image_dir)):
        if value in ("", "???"):
            raise UserError(f"dataset.{key} is required: set it on the command line, e.g. dataset.{key}=...")
    if decode not in DECODES:
        raise UserError(f"dataset.decode={decode!r} is not known; allowed: {', '.join(DECODES)}")
    if decode == "auto":
        on_gpu = device is not None and torch.device(device).type == "cuda"
        decode = "device" if on_gpu and num_workers < WORKERS_TO_DECODE else "cpu"
    if image_size < 8:
        raise UserError(f"dataset.image_size={image_size} must be at least 8")
    folder = Path(image_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"dataset.image_dir={image_dir!r} is not a folder")
    if split_column is not None and (val_csv or test_csv):
        raise UserError("dataset.split_column takes the splits from dataset.csv: leave val_csv and test_csv null")

    needed = [path_column, label_column] + ([split_column] if split_column else [])
    main = read_csv(csv)
    check_columns(main, csv, needed)
    frames: dict[str, tuple[pd.DataFrame, str]] = {}
    if split_column is not None:
        unknown = ~main[split_column].isin(SPLITS)
        if unknown.any():
            position = int(unknown.to_numpy().nonzero()[0][0])
            raise UserError(f"{csv}, line {line_of(main, position)}: {split_column}={main[split_column].iat[position]!r}; "
                            f"allowed: {', '.join(SPLITS)}")
        frames = {split: (main[main[split_column] == split], csv) for split in SPLITS
                  if split == "train" or (main[split_column] == split).any()}
    else:
        frames["train"] = (main, csv)
        for split, other in (("val", val_csv), ("test", test_csv)):
            if other is not None:
                frame = read_csv(other)
                check_columns(frame, other, needed)
                frames[split] = (frame, other)
    for split, (frame, name) in frames.items():
        if len(frame) == 0:
            raise UserError(f"{name}: the {split} split is empty (no rows)")

    for frame, name in frames.values():  # before the class names are settled from the values
        _check_filled(frame, name, label_column)
    names = _class_names(frames, label_column, classes)
    all_indices = all(_is_index(v) for frame, _ in frames.values() for v in frame[label_column])
    by_name, by_index = (True, True) if classes is not None else (not all_indices, all_indices)
    datasets, train_labels = {}, None
    for split, (frame, name) in frames.items():
        labels = _labels(frame, name, label_column, names, by_name, by_index)
        datasets[split] = CSVImages(_paths(frame, name, folder, path_column), labels,
                                    [line_of(frame, p) for p in range(len(frame))], name, image_size,
                                    on_device=decode == "device", transforms=train_tf if split == "train" else eval_tf)
        if split == "train":
            train_labels = labels
    unlabelled = predict_split(predict, eval_tf, image_size) if predict else None
    check_transforms([*datasets.values(), unlabelled], train_tf, eval_tf)
    return classification_bundle(datasets["train"], datasets.get("val"), datasets.get("test"), names, train_labels,
                                 channels=3, image_size=image_size, predict=unlabelled)

"""``multilabel_csv``: your own images, listed in a CSV with one 0/1 column per label.

The CSV has an image-path column (``path_column``, relative to ``image_dir`` or absolute) and one
column per label holding 0 or 1, as a pandas ``train_df[CLASSES]`` holds. The splits come either
from three CSVs (``csv`` for train, ``val_csv``, ``test_csv``; val and test may be left out) or
from one CSV with a ``split_column`` whose values are train, val or test.

Everything cheap is checked at start-up, with the CSV file and line named (line 1 is the header):
missing columns, labels that are not 0/1, image files that do not exist, empty splits. A file that
exists but cannot be decoded is reported, with its line, when it is first read.

Images are decoded with torchvision (any format it reads, converted to RGB), go through
``train_transforms`` (training split) or ``eval_transforms`` (the others; per sample, seeded:
runner/data/transforms.py), are resized to ``image_size`` squared where the transforms left
another size (antialiased, rounded to 8 bits) and normalised with the ImageNet mean and std (the
statistics DenseNet121's ImageNet weights expect). Where that happens is ``decode``:

* ``cpu``: the DataLoader workers (``trainer.num_workers``) decode and resize; 8-bit images go to
  the device, which normalises them (a quarter of the bytes of float images).
* ``device``: the workers only read the files; each batch of JPEGs is decoded on the run's device
  in one call (``torchvision.io.decode_jpeg``, nvJPEG on a GPU), then resized and normalised
  there (with transforms: transformed and resized one image at a time, each under its own seed).
  Files that are not JPEGs are still decoded by the workers.
* ``auto`` (default): the faster of the two as measured on an H100 with 16 CPU cores
  (benchmarks/README.md, "Images from files"): ``cpu`` with 8 or more workers (they keep even a
  CUDA-graphed DenseNet121 98-99% fed, and nvJPEG's share of the GPU is then a loss), ``device``
  on a GPU with fewer (4 CPU workers decode 1,650 images/s, below what the GPU trains at; nvJPEG
  decodes 7,700), and ``cpu`` on the CPU.
"""
from __future__ import annotations

import csv as csv_module
import functools
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms.v2.functional import resize

from runner.data.sampling import check_sampler, multilabel_bundle
from runner.data.transforms import Transforms, check_first, fit_size, item_key, without_augmentation
from runner.data.unlabelled import UnlabelledImages, images_under
from runner.engine.family import DataBundle
from runner.errors import UserError

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SPLITS = ("train", "val", "test")
DECODES = ("auto", "cpu", "device")
WORKERS_TO_DECODE = 8  # from this many DataLoader workers on, decode=auto decodes on the CPU
_JPEG_START = b"\xff\xd8\xff"


@functools.lru_cache(maxsize=None)
def _stats_on(device: torch.device) -> tuple[Tensor, Tensor]:
    # Copied once per device: a copy from pageable memory per batch would wait for the GPU.
    return _MEAN.to(device), _STD.to(device)


def normalise(images: Tensor) -> Tensor:
    """8-bit RGB images [B, 3, S, S] as the float inputs the ImageNet weights expect. Float
    images were normalised by the transforms (ToDtype + Normalize) and are left as they are."""
    if images.dtype != torch.uint8:
        return images
    mean, std = _stats_on(images.device)
    return (images.float() / 255 - mean) / std


class CSVImages(Dataset):
    """The images of one split. Items are (8-bit image [3, S, S], labels [L]); with
    ``on_device`` the JPEGs stay encoded (1-D bytes) until ``to_device`` decodes a whole batch.
    An item key may be ``(index, seed)`` (training with transforms: ``seeded_items``)."""

    def __init__(self, paths: list[Path], labels: Tensor, lines: list[int], csv: str, image_size: int,
                 on_device: bool = False, transforms: Transforms | None = None) -> None:
        self.paths, self.labels, self.lines, self.csv, self.image_size = paths, labels, lines, csv, image_size
        self.on_device, self.transforms = on_device, transforms or Transforms()

    @property
    def seeded_items(self) -> bool:
        return self.transforms.active

    def sample_ids(self) -> list[str]:
        return [str(p) for p in self.paths]

    def without_augmentation(self) -> "CSVImages":
        return without_augmentation(self, "transforms")

    def __len__(self) -> int:
        return len(self.paths)

    def _cannot_read(self, i: int, error: Exception) -> UserError:
        return UserError(f"{self.csv}, line {self.lines[i]}: cannot read image {self.paths[i]}: {error}")

    def _resize(self, image: Tensor) -> Tensor:
        return resize(image, [self.image_size, self.image_size], antialias=True)

    def _finish(self, i: int, image: Tensor, seed: int) -> Tensor:
        """Item i's decoded image through the split's transforms, at image_size."""
        return fit_size(self.transforms(image, seed, f"{self.csv}, line {self.lines[i]}: {self.paths[i]}"),
                        self.image_size)

    def _decode(self, i: int, data: Tensor, seed: int) -> Tensor:
        try:
            image = decode_image(data, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError, OSError) as e:
            raise self._cannot_read(i, e) from None
        return self._finish(i, image, seed)

    def __getitem__(self, key: Any) -> Any:
        i, seed = item_key(key)
        try:
            data = read_file(str(self.paths[i]))
        except (RuntimeError, OSError) as e:
            raise self._cannot_read(i, e) from None
        if not self.on_device:
            return self._decode(i, data, seed), self.labels[i]
        is_jpeg = bytes(data[:3].tolist()) == _JPEG_START
        return (data if is_jpeg else self._decode(i, data, seed)), self.labels[i], i, seed

    def collate(self, items: list[Any]) -> Any:
        """Default collation for decoded items. Encoded ones: all the JPEG bytes of the batch in
        one tensor, the images the workers decoded stacked, and where each belongs in the batch.
        One copied block per batch, not the per-file tensors ``read_file`` returns: sent from a
        worker one by one, those failed to share (bad file descriptor) and the loader hung."""
        if not self.on_device:
            return torch.utils.data.default_collate(items)
        payloads, labels, index, seeds = zip(*items)
        jpeg_at = [k for k, p in enumerate(payloads) if p.dim() == 1]
        decoded_at = [k for k, p in enumerate(payloads) if p.dim() == 3]
        size = self.image_size
        return {
            "jpeg_bytes": torch.cat([payloads[k] for k in jpeg_at]) if jpeg_at else torch.zeros(0, dtype=torch.uint8),
            "jpeg_sizes": torch.tensor([payloads[k].numel() for k in jpeg_at], dtype=torch.long),
            "jpeg_at": torch.tensor(jpeg_at, dtype=torch.long),
            "decoded": torch.stack([payloads[k] for k in decoded_at]) if decoded_at
            else torch.zeros(0, 3, size, size, dtype=torch.uint8),
            "decoded_at": torch.tensor(decoded_at, dtype=torch.long),
            "labels": torch.stack(labels), "index": torch.tensor(index, dtype=torch.long),
            "seeds": torch.tensor(seeds, dtype=torch.long),
        }

    def to_device(self, batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        """(normalised images [B, 3, S, S], labels [B, L]) on ``device``."""
        if not self.on_device:
            images, labels = batch
            return normalise(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        n = batch["labels"].shape[0]
        images: list[Tensor | None] = [None] * n
        for k, image in zip(batch["decoded_at"].tolist(), batch["decoded"].to(device, non_blocking=True)):
            images[k] = image
        jpeg_at = batch["jpeg_at"].tolist()
        if jpeg_at:
            files = list(torch.split(batch["jpeg_bytes"], batch["jpeg_sizes"].tolist()))
            try:
                decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                raise self._first_bad_jpeg([int(batch["index"][k]) for k in jpeg_at], files) from None
            for k, image in zip(jpeg_at, decoded):
                i = int(batch["index"][k])
                images[k] = self._finish(i, image, int(batch["seeds"][k])) if self.transforms.active else image
        if len({tuple(image.shape) for image in images}) == 1:  # one resize call when all have one size
            stacked = self._resize(torch.stack(images))
        else:
            stacked = torch.stack([self._resize(image) for image in images])
        return normalise(stacked), batch["labels"].to(device, non_blocking=True)

    def _first_bad_jpeg(self, indices: list[int], payloads: list[Tensor]) -> UserError:
        """A batch failed to decode: find its first bad file by decoding them one by one on the CPU."""
        for i, data in zip(indices, payloads):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                return self._cannot_read(i, e)
        return UserError(f"{self.csv}: a batch of JPEGs (lines {', '.join(str(self.lines[i]) for i in indices)}) "
                         "could not be decoded on the device, though each decodes on the CPU; try dataset.decode=cpu")


def read_csv(csv: str) -> pd.DataFrame:
    """The CSV with its rows indexed by position among the file's lines (blank lines kept, then
    dropped), so that ``index + 2`` is a row's line number. A column named twice is refused:
    pandas would rename the second one ("cat.1") and read it as a column of its own."""
    path = Path(csv).expanduser()
    if not path.is_file():
        raise UserError(f"dataset CSV {csv!r}: no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first name
            header = next(csv_module.reader(f), [])
        repeated = next((name for i, name in enumerate(header) if name in header[:i]), None)
        if repeated is not None:
            raise UserError(f"{csv}, line 1: column {repeated!r} appears more than once; each column needs its own name")
        return pd.read_csv(path, index_col=False, skip_blank_lines=False).dropna(how="all")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv_module.Error) as e:
        raise UserError(f"dataset CSV {csv!r} cannot be parsed: {str(e).splitlines()[0]}") from None


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, for messages (2, not np.int64(2))."""
    return value.item() if hasattr(value, "item") else value


def _check_columns(frame: pd.DataFrame, csv: str, needed: list[str]) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise UserError(f"{csv}: missing column(s) {', '.join(map(repr, missing))}; "
                        f"columns present: {', '.join(map(str, frame.columns))}")


def _split_dataset(frame: pd.DataFrame, csv: str, split: str, image_dir: Path, path_column: str,
                   label_columns: list[str], image_size: int, on_device: bool, transforms: Transforms) -> CSVImages:
    if len(frame) == 0:
        raise UserError(f"{csv}: the {split} split is empty (no rows)")
    lines = [int(i) + 2 for i in frame.index]  # +1 for the header, +1 because lines count from 1
    values = frame[label_columns]
    # Compared as numbers: one text entry ("abc") makes pandas read the whole column as text.
    bad = ~values.apply(pd.to_numeric, errors="coerce").isin([0, 1])
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
    labels = torch.tensor(values.apply(pd.to_numeric).to_numpy(dtype="float32"))
    return CSVImages(paths, labels, lines, csv, image_size, on_device, transforms)


def _unlabelled_item(path: Path, index: int, transforms: Transforms, image_size: int) -> Tensor:
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return fit_size(transforms(image, index, path), image_size)


def predict_split(folder: str, transforms: Transforms, image_size: int) -> UnlabelledImages:
    """``dataset.predict``: a folder of images without labels, decoded by the workers, as the
    other splits' 8-bit RGB images (normalised on the device)."""
    return UnlabelledImages(images_under(folder), functools.partial(_unlabelled_item, transforms=transforms,
                                                                    image_size=image_size), finish=normalise)


def check_transforms(splits: list[Dataset | None], *transforms: Transforms) -> None:
    """Make one item of each split when there are transforms: a list that cannot work stops here."""
    if any(t.active for t in transforms):
        for split in splits:
            if split is not None:
                check_first(split)


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
    decode: str = "auto",
    train_transforms: list | None = None,
    eval_transforms: list | None = None,
    predict: str | None = None,
    device: torch.device | None = None,
    num_workers: int = 0,
) -> DataBundle:
    """``device`` and ``num_workers`` (the run's, supplied by the engine) settle ``decode=auto``."""
    check_sampler(sampler)
    train_tf, eval_tf = Transforms(train_transforms, "train_transforms"), Transforms(eval_transforms, "eval_transforms")
    if decode not in DECODES:
        raise UserError(f"dataset.decode={decode!r} is not known; allowed: {', '.join(DECODES)}")
    if decode == "auto":
        on_gpu = device is not None and torch.device(device).type == "cuda"
        decode = "device" if on_gpu and num_workers < WORKERS_TO_DECODE else "cpu"
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

    main = read_csv(csv)
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
                frame = read_csv(other)
                _check_columns(frame, other, needed)
                frames[split] = (frame, other)

    datasets = {
        split: _split_dataset(frame, name, split, folder, path_column, list(label_columns), image_size,
                              on_device=decode == "device", transforms=train_tf if split == "train" else eval_tf)
        for split, (frame, name) in frames.items()
    }
    unlabelled = predict_split(predict, eval_tf, image_size) if predict else None
    check_transforms([*datasets.values(), unlabelled], train_tf, eval_tf)
    train_labels = datasets["train"].labels
    return multilabel_bundle(datasets["train"], datasets.get("val"), datasets.get("test"), list(label_columns),
                             train_labels, sampler, predict=unlabelled)

"""Binarised 28x28 image sets for the density family (VAE / IWAE).

Every builder returns a ``DataBundle(family="density")`` whose items are float tensors [784]
in [0, 1], row-major 28x28, object/ink = 1. ``info`` holds ``dim`` (784), ``image_shape``
((28, 28)) and ``train_mean`` (per-pixel mean of the training items, for the decoder's output
bias, as in Burda et al.'s code).

Binarisation (what is random, and when):

* training, ``binarize: dynamic`` (default, as in the paper): the training items stay grey
  levels and the family draws ``torch.bernoulli(x)`` from the global (seeded, checkpointed) RNG
  each time a batch is used, so every pass sees a fresh binarisation;
* training, ``binarize: fixed``: the training items are binarised once at load from a
  generator seeded with ``binarize_seed``; the family's ``bernoulli`` then leaves them as they are
  (bernoulli of 0 or 1 is 0 or 1);
* validation and test: always binarised once at load, from generators seeded with
  ``binarize_seed + 1`` (val) and ``binarize_seed + 2`` (test), so evaluation numbers are
  comparable across runs and do not depend on the training binarisation mode.

Already-binary sets (Caltech 101 Silhouettes, the embedded silhouettes) are passed through.
The validation split of MNIST-like sets is the last ``n_val`` training images (``n_val: 0`` →
no validation split; the paper trained on all 60,000).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from runner.data.idx import find_idx, read_idx
from runner.data.silhouettes import make_silhouettes
from runner.engine.family import DataBundle
from runner.errors import UserError

SIDE = 28
DIM = SIDE * SIDE
BINARIZE_MODES = ("dynamic", "fixed")


class ImageRows(Dataset):
    """Rows of a float tensor [N, 784]; an item is one row (a plain tensor, so batches are [B, 784])."""

    def __init__(self, pixels: Tensor):
        self.pixels = pixels.contiguous()
        self.tensors = (self.pixels,)  # lets the engine keep the set on the GPU (trainer.data_on_device)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.pixels[i]


def _binarize_once(pixels: Tensor, seed: int) -> Tensor:
    return torch.bernoulli(pixels, generator=torch.Generator().manual_seed(seed))


def _check_binarize(binarize: str) -> None:
    if binarize not in BINARIZE_MODES:
        raise UserError(f"dataset.binarize={binarize!r}: allowed values are {', '.join(BINARIZE_MODES)}")


def _check_n_val(n_val: int, n_train: int) -> None:
    if not 0 <= n_val < n_train:
        raise UserError(f"dataset.n_val={n_val}: must be >= 0 and below the {n_train} training images")


def bundle_from_pixels(train: Tensor, test: Tensor, *, n_val: int, binarize: str, binarize_seed: int,
                       val: Tensor | None = None, name: str = "") -> DataBundle:
    """Split, binarise (see the module docstring) and wrap float pixel tensors [N, 784] in [0, 1].

    ``val`` given → it is the validation split and ``n_val`` is ignored; else the last ``n_val``
    training rows are held out."""
    _check_binarize(binarize)
    if val is None:
        _check_n_val(n_val, train.shape[0])
        if n_val:
            train, val = train[:-n_val], train[-n_val:]
    train_mean = train.mean(0)
    if binarize == "fixed":
        train = _binarize_once(train, binarize_seed)
    info = {"dim": DIM, "image_shape": (SIDE, SIDE), "train_mean": train_mean, "name": name}
    return DataBundle(
        family="density",
        train=ImageRows(train),
        val=ImageRows(_binarize_once(val, binarize_seed + 1)) if val is not None else None,
        test=ImageRows(_binarize_once(test, binarize_seed + 2)),
        info=info,
    )


def _idx_pixels(root: str, stem: str) -> Tensor:
    images = read_idx(find_idx(root, stem))
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise UserError(f"{stem} in dataset.root={root} holds images of shape {images.shape[1:]}, expected (28, 28)")
    return torch.from_numpy(images.reshape(len(images), DIM).astype(np.float32) / 255.0)


def _torchvision_pixels(cls_name: str, root: str) -> tuple[Tensor, Tensor]:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    split = [cls(root, train=t, download=True).data for t in (True, False)]
    return tuple(s.reshape(len(s), DIM).float() / 255.0 for s in split)  # type: ignore[return-value]


def _idx_set(root: str, download: bool, torchvision_name: str) -> tuple[Tensor, Tensor]:
    if download:
        return _torchvision_pixels(torchvision_name, root)
    if not Path(root).expanduser().is_dir():
        raise UserError(f"dataset.root={root} is not a folder; point it at the IDX files "
                        f"or set dataset.download=true to fetch them with torchvision")
    return _idx_pixels(root, "train-images-idx3-ubyte"), _idx_pixels(root, "t10k-images-idx3-ubyte")


def mnist(root: str = "data/mnist", n_val: int = 10000, binarize: str = "dynamic", binarize_seed: int = 0,
          download: bool = False) -> DataBundle:
    """MNIST from IDX files (plain or .gz) in ``root``; torchvision downloads only with ``download``."""
    train, test = _idx_set(root, download, "MNIST")
    return bundle_from_pixels(train, test, n_val=n_val, binarize=binarize, binarize_seed=binarize_seed, name="mnist")


def fashion_mnist(root: str = "/usr/share/datasets/fashion-mnist", n_val: int = 10000, binarize: str = "dynamic",
                  binarize_seed: int = 0, download: bool = False) -> DataBundle:
    """Fashion-MNIST from IDX files (Debian's ``dataset-fashion-mnist`` installs them at the default root)."""
    train, test = _idx_set(root, download, "FashionMNIST")
    return bundle_from_pixels(train, test, n_val=n_val, binarize=binarize, binarize_seed=binarize_seed,
                              name="fashion_mnist")


CALTECH_FILE = "caltech101_silhouettes_28_split1.mat"


def caltech_rows(raw: np.ndarray) -> Tensor:
    """The .mat rows (1 = background, column-major) as object = 1, row-major float rows."""
    images = raw.reshape(-1, SIDE, SIDE).transpose(0, 2, 1)  # column-major rows → upright images
    return torch.from_numpy(1.0 - images.reshape(-1, DIM).astype(np.float32))


def caltech_silhouettes(root: str = "data/caltech101_silhouettes") -> DataBundle:
    """Caltech 101 Silhouettes 28x28, Marlin's split 1 (4100 train / 2264 val / 2307 test).

    Already binary, so no binarisation is drawn; the file's own validation split is used."""
    from scipy.io import loadmat

    path = Path(root).expanduser() / CALTECH_FILE
    if not path.is_file():
        raise UserError(f"{CALTECH_FILE} not found in dataset.root={root}")
    try:
        mat = loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises several kinds for a file that is not .mat
        raise UserError(f"{path} is not a MATLAB .mat file that scipy can read: {str(e).splitlines()[0]}") from None
    splits = {}
    for split in ("train", "val", "test"):
        key = f"{split}_data"
        if key not in mat or mat[key].shape[1:] != (DIM,):
            raise UserError(f"{path} has no {key} of shape (N, {DIM}); is it the 28x28 split1 file?")
        splits[split] = caltech_rows(mat[key])
    return bundle_from_pixels(splits["train"], splits["test"], val=splits["val"], n_val=0, binarize="fixed",
                              binarize_seed=0, name="caltech_silhouettes")


def silhouettes(n_train: int = 5000, n_val: int = 1000, n_test: int = 1000, seed: int = 0,
                two_shape_fraction: float = 0.3) -> DataBundle:
    """The embedded procedural silhouettes (runner/data/silhouettes.py): binary, no download."""
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if value <= 0:
            raise UserError(f"dataset.{key}={value}: must be a positive number of images")
    if n_val < 0:
        raise UserError(f"dataset.n_val={n_val}: must be >= 0")
    # The splits are disjoint slices of one seeded draw.
    images = make_silhouettes(n_train + n_val + n_test, seed, two_shape_fraction)
    train, val, test = images[:n_train], images[n_train:n_train + n_val], images[n_train + n_val:]
    return bundle_from_pixels(train, test, val=val if n_val else None, n_val=0, binarize="fixed",
                              binarize_seed=seed, name="silhouettes")

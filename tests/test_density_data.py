"""The binarised image sets: shapes, values, splits, orientation, binarisation, errors."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, require
from runner.data.binarized import caltech_silhouettes, fashion_mnist, mnist, silhouettes
from runner.errors import UserError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def idx_images(path: Path) -> np.ndarray:
    """Independent reader: gzip + numpy at the documented offset (PROVENANCE.md)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)


def is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


@pytest.mark.parametrize("builder,root", [(mnist, SHARED_DATA / "mnist"), (fashion_mnist, FASHION_ROOT)])
def test_idx_sets_split_and_binarise(builder, root):
    require(root / "train-images-idx3-ubyte.gz")
    bundle = builder(root=str(root), n_val=10000)
    assert bundle.family == "density"
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (50000, 10000, 10000)
    assert bundle.info["dim"] == 784 and tuple(bundle.info["image_shape"]) == (28, 28)
    raw = idx_images(root / "train-images-idx3-ubyte.gz")
    # Training items: grey levels (binarised dynamically by the family), in file order.
    first = bundle.train[0]
    assert first.shape == (784,) and first.dtype == torch.float32
    np.testing.assert_allclose(first.numpy(), raw[0] / 255.0, rtol=1e-6)
    assert not is_binary(bundle.train.pixels[:100])
    np.testing.assert_allclose(bundle.info["train_mean"].numpy(), raw[:50000].mean(0) / 255.0, atol=1e-5)
    # Val = the last 10000 training images, binarised once: 0/1, and 1 only where there is ink.
    val = bundle.val.pixels
    assert is_binary(val) and is_binary(bundle.test.pixels)
    assert bool((val[raw[50000:] == 0] == 0).all()) and bool((val[raw[50000:] == 255] == 1).all())
    # The evaluation binarisation is seeded: the same on every load, whatever the training mode.
    again = builder(root=str(root), n_val=0, binarize="fixed")
    assert torch.equal(again.test.pixels, bundle.test.pixels) and is_binary(again.train.pixels)
    assert len(again.train) == 60000 and again.val is None  # n_val=0: train on all (the paper)


def test_bad_roots_and_settings_name_the_key(tmp_path):
    with pytest.raises(UserError, match="dataset.root"):
        mnist(root=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="dataset.root"):
        mnist(root=str(tmp_path))  # a folder without the IDX files
    with pytest.raises(UserError, match="dataset.root"):
        caltech_silhouettes(root=str(tmp_path))
    require(SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz")
    with pytest.raises(UserError, match="dataset.binarize"):
        mnist(root=str(SHARED_DATA / "mnist"), binarize="sometimes")
    with pytest.raises(UserError, match="dataset.n_val"):
        mnist(root=str(SHARED_DATA / "mnist"), n_val=60000)
    with pytest.raises(UserError, match="dataset.n_val"):
        mnist(root=str(SHARED_DATA / "mnist"), n_val=-1)


def test_caltech_silhouettes_orientation_and_polarity():
    from scipy.io import loadmat

    path = require(SHARED_DATA / "caltech101_silhouettes" / "caltech101_silhouettes_28_split1.mat")
    bundle = caltech_silhouettes(root=str(path.parent))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (4100, 2264, 2307)
    for split in (bundle.train, bundle.val, bundle.test):
        assert is_binary(split.pixels)
    # Object = 1 after inverting the file's 1 = background: fewer object pixels than background.
    assert 0.2 < float(bundle.train.pixels.mean()) < 0.5
    images = bundle.train.pixels.reshape(-1, 28, 28)
    border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    assert float(border.mean()) < 0.05
    raw = loadmat(path)["train_data"]
    for i in (0, 1, 2):
        upright = 1 - raw[i].reshape(28, 28, order="F")  # the documented column-major layout
        assert np.array_equal(images[i].numpy(), upright)
        assert not np.array_equal(images[i].numpy(), 1 - raw[i].reshape(28, 28))  # not transposed


def test_silhouettes_are_binary_seeded_and_sized():
    a = silhouettes(n_train=300, n_val=50, n_test=60, seed=3)
    b = silhouettes(n_train=300, n_val=50, n_test=60, seed=3)
    c = silhouettes(n_train=300, n_val=50, n_test=60, seed=4)
    assert (len(a.train), len(a.val), len(a.test)) == (300, 50, 60)
    assert torch.equal(a.train.pixels, b.train.pixels) and torch.equal(a.test.pixels, b.test.pixels)
    assert not torch.equal(a.train.pixels, c.train.pixels)
    assert is_binary(a.train.pixels) and a.train[0].shape == (784,)
    assert 0.05 < float(a.train.pixels.mean()) < 0.5
    per_image = a.train.pixels.sum(1)
    assert bool((per_image > 10).all())  # every image shows a shape
    torch.testing.assert_close(a.info["train_mean"], a.train.pixels.mean(0))
    assert silhouettes(n_train=10, n_val=0, n_test=5).val is None
    with pytest.raises(UserError, match="dataset.n_train"):
        silhouettes(n_train=0)

"""Multi-label datasets: shapes prevalences and determinism, every CSV loader error with the
file and line named, the balanced sampler, Fashion-MNIST mosaics where the files exist."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import WeightedRandomSampler
from torchvision.io import write_png

from runner.data import fashion_mosaic, multilabel_csv, shapes
from runner.data.sampling import rarest_label_weights, train_weights
from runner.errors import UserError


def test_shapes_prevalences_close_to_requested_and_deterministic():
    requested = [0.08, 0.29, 0.17, 0.47]
    bundle = shapes.build(n_train=6000, n_val=10, n_test=10, image_size=24, prevalences=requested, seed=3)
    images, labels = bundle.train.tensors
    assert images.shape == (6000, 3, 24, 24) and labels.shape == (6000, 4)
    measured = labels.mean(0)
    # 6000 draws: the standard error is at most 0.0065; allow 4 of them.
    assert torch.allclose(measured, torch.tensor(requested), atol=0.026)
    assert bundle.info["train_labels"] is labels and bundle.info["num_labels"] == 4
    again = shapes.build(n_train=6000, n_val=10, n_test=10, image_size=24, prevalences=requested, seed=3)
    assert torch.equal(again.train.tensors[0], images)
    other = shapes.build(n_train=100, n_val=10, n_test=10, image_size=24, prevalences=requested, seed=3)
    assert torch.equal(other.val.tensors[0], bundle.val.tensors[0])  # val does not depend on n_train
    custom = shapes.build(n_train=4000, n_val=10, n_test=10, image_size=16, prevalences=[0.5, 0.05, 0.05, 0.9])
    assert torch.allclose(custom.train.tensors[1].mean(0), torch.tensor([0.5, 0.05, 0.05, 0.9]), atol=0.03)


def test_shapes_labels_are_visible_in_the_image():
    images, labels = shapes.build(n_train=500, n_val=1, n_test=1).train.tensors
    raw = images * shapes._STD + shapes._MEAN
    # Red square: many strongly red pixels exactly when label 0 is on.
    red = ((raw[:, 0] > 0.7) & (raw[:, 1] < 0.4) & (raw[:, 2] < 0.4)).flatten(1).sum(1)
    assert ((red > 5).float() == labels[:, 0]).float().mean() > 0.97


def test_shapes_config_errors():
    with pytest.raises(UserError, match="dataset.sampler='oversample'.*none, balanced"):
        shapes.build(sampler="oversample")
    with pytest.raises(UserError, match="prevalences"):
        shapes.build(prevalences=[0.1, 0.2])


def test_balanced_sampler_raises_the_rare_label_frequency():
    bundle = shapes.build(n_train=3000, n_val=1, n_test=1, image_size=16, sampler="balanced")
    labels = bundle.info["train_labels"]
    weights = bundle.train_weights
    assert weights is not None and weights.shape == (3000,) and float(weights.mean()) == pytest.approx(1.0)
    drawn = list(WeightedRandomSampler(weights.double(), 20000, generator=torch.Generator().manual_seed(0)))
    drawn_freq = labels[drawn].mean(0)
    base_freq = labels.mean(0)
    assert drawn_freq[0] > 2.5 * base_freq[0]  # 8% -> more than 20%
    assert drawn_freq[0] > 0.2
    # Every image keeps all its labels, and the images with no label still get drawn.
    assert (labels[drawn].sum(1) == 0).float().mean() > 0.05
    assert train_weights("none", labels) is None


def test_rarest_label_weights_by_hand():
    labels = torch.tensor([[1, 1], [0, 1], [0, 1], [0, 0]], dtype=torch.float32)
    # freqs: 0.25, 0.75 ; none-group: 0.25 -> raw weights 4, 4/3, 4/3, 4 ; mean 8/3.
    expected = torch.tensor([4, 4 / 3, 4 / 3, 4]) / (32 / 3 / 4)
    assert torch.allclose(rarest_label_weights(labels), expected)


# --- multilabel_csv ---------------------------------------------------------------------------

CLASSES = ["cat", "dog", "bird"]


def _image_folder(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        size = 20 + 3 * i  # various sizes: all resized
        write_png(torch.randint(0, 256, (3, size, size + 1), generator=g, dtype=torch.uint8), str(folder / f"{i}.png"))
    return folder


def _csv(path: Path, rows: list[str], header: str = "path,cat,dog,bird") -> str:
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def _rows(start: int, stop: int) -> list[str]:
    return [f"{i}.png,{i % 2},{(i // 2) % 2},{int(i % 5 == 0)}" for i in range(start, stop)]


def test_csv_separate_files_load_resize_and_normalise(tmp_path):
    folder = _image_folder(tmp_path, 12)
    bundle = multilabel_csv.build(
        csv=_csv(tmp_path / "train.csv", _rows(0, 8)), val_csv=_csv(tmp_path / "val.csv", _rows(8, 10)),
        test_csv=_csv(tmp_path / "test.csv", _rows(10, 12)), image_dir=str(folder), image_size=32,
    )
    assert bundle.family == "multilabel" and bundle.info["label_names"] == CLASSES
    assert len(bundle.train) == 8 and len(bundle.val) == 2 and len(bundle.test) == 2
    image, labels = bundle.train[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert labels.tolist() == [1.0, 1.0, 0.0]
    assert bundle.info["train_labels"].shape == (8, 3)
    assert bundle.info["prevalence"] == pytest.approx([0.5, 0.5, 0.25])


def test_csv_split_column_and_label_subset(tmp_path):
    folder = _image_folder(tmp_path, 9)
    splits = ["train"] * 5 + ["val"] * 2 + ["test"] * 2
    rows = [f"{r},{s}" for r, s in zip(_rows(0, 9), splits)]
    bundle = multilabel_csv.build(csv=_csv(tmp_path / "all.csv", rows, "path,cat,dog,bird,split"),
                                  image_dir=str(folder), split_column="split", label_columns=["dog", "cat"],
                                  image_size=16, sampler="balanced")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (5, 2, 2)
    assert bundle.info["label_names"] == ["dog", "cat"]
    # Images 5 and 6 are val: cat = i % 2, dog = (i // 2) % 2, in the order asked (dog, cat).
    assert bundle.val[0][1].tolist() == [0.0, 1.0] and bundle.val[1][1].tolist() == [1.0, 0.0]
    assert bundle.train_weights is not None and bundle.train_weights.shape == (5,)


@pytest.mark.parametrize(
    "header,rows,message",
    [
        ("path,cat,dog", [r.rpartition(",")[0] for r in _rows(0, 3)], r"train.csv: missing column\(s\) 'bird'"),
        ("path,cat,dog,bird", _rows(0, 2) + ["2.png,1,2,0"], r"train.csv, line 4: label 'dog' is 2; labels must be 0 or 1"),
        ("path,cat,dog,bird", _rows(0, 2) + ["2.png,1,,0"], r"train.csv, line 4: label 'dog' is nan"),
        ("path,cat,dog,bird", _rows(0, 2) + ["missing.png,1,0,0"], r"train.csv, line 4: image file .*missing.png does not exist"),
        ("path,cat,dog,bird", [], r"train.csv: the train split is empty"),
        ("file,cat,dog,bird", _rows(0, 3), r"train.csv: missing column\(s\) 'path'"),
    ],
    ids=["missing-label-column", "label-not-0-1", "empty-label", "missing-image", "empty-split", "missing-path-column"],
)
def test_csv_errors_name_the_file_and_line(tmp_path, header, rows, message):
    folder = _image_folder(tmp_path, 3)
    with pytest.raises(UserError, match=message):
        multilabel_csv.build(csv=_csv(tmp_path / "train.csv", rows, header), image_dir=str(folder),
                             label_columns=CLASSES)


def test_csv_error_in_the_val_file_and_empty_split_column(tmp_path):
    folder = _image_folder(tmp_path, 4)
    with pytest.raises(UserError, match=r"val.csv, line 2: label 'bird' is 7"):
        multilabel_csv.build(csv=_csv(tmp_path / "train.csv", _rows(0, 2)), image_dir=str(folder),
                             val_csv=_csv(tmp_path / "val.csv", ["2.png,0,0,7"]))
    rows = [f"{r},train" for r in _rows(0, 3)] + ["3.png,0,0,0,test"]
    with pytest.raises(UserError, match=r"all.csv: the val split is empty"):
        multilabel_csv.build(csv=_csv(tmp_path / "all.csv", rows, "path,cat,dog,bird,split"),
                             image_dir=str(folder), split_column="split")
    with pytest.raises(UserError, match=r"all.csv, line 2: split='training'; allowed: train, val, test"):
        multilabel_csv.build(csv=_csv(tmp_path / "all.csv", ["0.png,0,0,0,training"], "path,cat,dog,bird,split"),
                             image_dir=str(folder), split_column="split")


def test_csv_unreadable_image_names_the_line(tmp_path):
    folder = _image_folder(tmp_path, 3)
    (folder / "2.png").write_bytes(b"this is not an image")
    bundle = multilabel_csv.build(csv=_csv(tmp_path / "train.csv", _rows(0, 3)), image_dir=str(folder))
    bundle.train[1]
    with pytest.raises(UserError, match=r"train.csv, line 4: cannot read image .*2.png"):
        bundle.train[2]


# --- fashion_mosaic --------------------------------------------------------------------------

FASHION_ROOT = Path(fashion_mosaic.DEFAULT_ROOT)


def test_fashion_mosaic_missing_root_names_the_key_and_the_apt_command(tmp_path):
    with pytest.raises(UserError, match=r"dataset.root=.*apt-get install -y dataset-fashion-mnist"):
        fashion_mosaic.build(root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION_ROOT} "
                    "(apt-get install -y dataset-fashion-mnist)")
def test_fashion_mosaic_loads_with_prevalences_from_5_to_50_percent():
    bundle = fashion_mosaic.build(n_train=6000, n_val=500, n_test=500, image_size=32)
    image, labels = bundle.train[0]
    assert image.shape == (3, 32, 32) and labels.shape == (4,)
    prevalence = torch.tensor(bundle.info["prevalence"])
    assert torch.allclose(prevalence, torch.tensor(fashion_mosaic.PREVALENCES), atol=0.025)
    assert 0.03 < prevalence.min() and prevalence.max() < 0.55
    assert bundle.train.images.shape == (6000, 32, 32) and bundle.train.images.dtype == torch.uint8

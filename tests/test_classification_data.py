"""Classification datasets: the embedded patterns, MNIST / Fashion-MNIST from their IDX files,
an ImageFolder tree and a CSV of images written by the tests (errors name the file and line)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from conftest import SHARED_DATA, require
from runner.data import image_csv, imagefolder, mnist_classes, patterns
from runner.data.classification import stratified_split
from runner.errors import UserError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230)}


def test_patterns_are_seeded_balanced_and_split_independent():
    a = patterns.build(n_train=500, n_val=100, n_test=100, seed=3)
    b = patterns.build(n_train=300, n_val=100, n_test=100, seed=3)
    images, labels = a.train.tensors
    assert images.shape == (500, 1, 28, 28) and labels.dtype == torch.int64
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])  # n_train leaves val unchanged
    assert not torch.equal(a.val.tensors[0], patterns.build(n_train=10, n_val=100, n_test=10, seed=4).val.tensors[0])
    assert a.info["class_names"] == patterns.CLASS_NAMES and a.info["channels"] == 1 and a.info["image_size"] == 28
    assert a.info["class_counts"] == torch.bincount(labels, minlength=10).tolist() and min(a.info["class_counts"]) > 25
    assert abs(float(images.mean())) < 0.1 and 0.8 < float(images.std()) < 1.2  # normalised
    with pytest.raises(UserError, match="dataset.n_val=0 must be at least 1"):
        patterns.build(n_val=0)


def test_stratified_split_keeps_each_class_share():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 1)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert torch.bincount(labels[val], minlength=3).tolist() == [10, 4, 0]
    assert sorted(train.tolist() + val.tolist()) == list(range(71))
    assert torch.equal(stratified_split(labels, 0.2, seed=0)[1], val)
    assert not torch.equal(stratified_split(labels, 0.2, seed=1)[1], val)


def test_mnist_classes_from_the_idx_files():
    root = require(SHARED_DATA / "mnist")
    require(root / "train-labels-idx1-ubyte.gz")
    bundle = mnist_classes.mnist(str(root), n_val=5000)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (55000, 5000, 10000)
    assert hasattr(bundle.train, "tensors") and bundle.train.tensors[0].shape[1:] == (1, 28, 28)
    counts = bundle.info["class_counts"]
    assert sum(counts) == 55000 and min(counts) > 4500 and bundle.info["class_names"] == list("0123456789")
    # The test labels as published: 980 zeros ... 1009 nines.
    assert torch.bincount(bundle.test.tensors[1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist_classes.mnist(str(root), n_val=0).val is None


def test_fashion_mnist_classes_from_the_idx_files():
    require(FASHION_ROOT / "train-labels-idx1-ubyte.gz")
    bundle = mnist_classes.fashion_mnist(str(FASHION_ROOT), n_val=5000)
    assert torch.bincount(bundle.test.tensors[1]).tolist() == [1000] * 10
    assert bundle.info["class_names"][9] == "ankle_boot" and bundle.info["channels"] == 1
    images = bundle.train.tensors[0]
    assert abs(float(images.mean())) < 0.01 and abs(float(images.std()) - 1) < 0.01


def test_a_missing_idx_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        mnist_classes.mnist(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        mnist_classes.fashion_mnist(str(tmp_path))


def coloured_image(colour: str, shape: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A uint8 RGB image: a coloured square or disc at a random place on a grey background."""
    image = torch.full((3, size, size), 90, dtype=torch.uint8) + torch.randint(0, 30, (3, size, size), generator=g,
                                                                                dtype=torch.uint8)
    r = size // 4
    cy, cx = torch.randint(r, size - r, (2,), generator=g).tolist()
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r) if shape == "disc" else ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)
    for channel, value in enumerate(COLOURS[colour]):
        image[channel][mask] = value
    return image


def write_image_folder(root: Path, per_class: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """``root/<split>/<class>/<n>.png`` for the splits and counts given as {"train": 12, ...}."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"red": "square", "green": "disc", "blue": "square"}
    for split, count in per_class.items():
        for colour in COLOURS:
            folder = root / split / colour
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                write_png(coloured_image(colour, shapes[colour], size, g), str(folder / f"{i}.png"))
    return root


def test_imagefolder_classes_splits_and_images(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 10, "test": 2})
    bundle = imagefolder.build(str(root), image_size=16, val_fraction=0.2)
    assert bundle.info["class_names"] == ["blue", "green", "red"]  # sorted folder names
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (24, 6, 6)
    assert bundle.info["class_counts"] == [8, 8, 8]  # 2 of each class held out
    image, label = bundle.val[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    red = bundle.test[[label for _, label in bundle.test.samples].index(2)][0]
    assert float(red[0].max()) > float(red[2].max())  # red channel brightest, ImageNet-normalised
    grey = imagefolder.build(str(root), image_size=12, channels=1)
    assert grey.train[0][0].shape == (1, 12, 12) and grey.info["channels"] == 1
    with_val = write_image_folder(tmp_path / "data", {"val": 3})
    assert len(imagefolder.build(str(with_val), image_size=16).val) == 9


def test_imagefolder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(UserError, match="has no train/ folder"):
        imagefolder.build(str(tmp_path))
    root = write_image_folder(tmp_path / "data", {"train": 4})
    (root / "test" / "purple").mkdir(parents=True)
    with pytest.raises(UserError, match=r"class folder\(s\) purple are not in the train split"):
        imagefolder.build(str(root))
    (root / "test" / "purple").rmdir()
    with pytest.raises(UserError, match=r"data/test holds no image \(\.jpg"):
        imagefolder.build(str(root))
    (root / "test").rmdir()
    (root / "train" / "red" / "9.png").write_bytes(b"not a png")
    bundle = imagefolder.build(str(root), image_size=16, val_fraction=0.25)
    bad = next(i for i, (path, _) in enumerate(bundle.train.samples) if path.endswith("9.png"))
    with pytest.raises(UserError, match=r"cannot read image .*red/9\.png"):
        bundle.train[bad]


def test_imagefolder_empty_class_folder_of_train_is_refused_of_val_warned(tmp_path, caplog):
    """An empty train/fox/ would be a fourth class with no images, counted in the outputs."""
    root = write_image_folder(tmp_path / "data", {"train": 4, "val": 1})
    (root / "train" / "fox").mkdir()
    with pytest.raises(UserError, match=r"data/train/fox holds no image \(\.jpg.*every class folder of train needs"):
        imagefolder.build(str(root), image_size=16)
    (root / "train" / "fox").rmdir()
    (root / "val" / "red" / "0.png").unlink()  # val/red now empty: allowed, as a missing folder is, but said
    with caplog.at_level("WARNING"):
        bundle = imagefolder.build(str(root), image_size=16)
    assert bundle.info["class_names"] == ["blue", "green", "red"] and len(bundle.val) == 2
    assert any("val/red holds no image" in r.getMessage() for r in caplog.records), caplog.text


def write_csv_images(tmp_path: Path, n: int = 12) -> Path:
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        write_png(coloured_image(list(COLOURS)[i % 3], "square", 16, g), str(folder / f"{i}.png"))
    return folder


def test_image_csv_by_names_indices_and_split_column(tmp_path):
    folder = write_csv_images(tmp_path)
    names = list(COLOURS)
    rows = [f"{i}.png,{names[i % 3]},{'train' if i < 8 else 'val' if i < 10 else 'test'}" for i in range(12)]
    (tmp_path / "all.csv").write_text("path,colour,split\n" + "\n".join(rows) + "\n")
    bundle = image_csv.build(str(tmp_path / "all.csv"), str(folder), split_column="split", label_column="colour",
                             image_size=16)
    assert bundle.info["class_names"] == ["blue", "green", "red"]
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 2)
    image, label = bundle.train[0]
    assert image.shape == (3, 16, 16) and int(label) == 2  # 0.png is red
    (tmp_path / "idx.csv").write_text("path,label\n" + "\n".join(f"{i}.png,{i % 3}" for i in range(12)) + "\n")
    by_index = image_csv.build(str(tmp_path / "idx.csv"), str(folder), image_size=16)
    assert by_index.info["class_names"] == ["0", "1", "2"] and by_index.info["class_counts"] == [4, 4, 4]
    named = image_csv.build(str(tmp_path / "idx.csv"), str(folder), classes=["red", "green", "blue"], image_size=16)
    assert named.info["class_names"] == ["red", "green", "blue"] and int(named.train[0][1]) == 0


@pytest.mark.parametrize("content, needle", [
    ("path,label\n0.png,red\n1.png,green\n\n3.png,\n", r"train\.csv, line 5: 'label' is empty"),
    ("path,label\n0.png,red\n\n7777.png,green\n", r"train\.csv, line 4: image file .*7777\.png does not exist"),
    ("path,colour\n0.png,red\n", r"train\.csv, line 1 \(header\): no column 'label'; columns present: path, colour"),
    ("path,label,split\n0.png,red,train\n1.png,green,tset\n", r"train\.csv, line 3: split='tset'; allowed: train, val, test"),
])
def test_image_csv_errors_name_the_file_and_line(tmp_path, content, needle):
    folder = write_csv_images(tmp_path)
    (tmp_path / "train.csv").write_text(content)
    split = "split" if "split" in content.splitlines()[0] else None
    with pytest.raises(UserError, match=needle):
        image_csv.build(str(tmp_path / "train.csv"), str(folder), split_column=split)


def test_image_csv_column_named_twice_is_refused(tmp_path):
    """pandas would rename the second 'label' to 'label.1' and train on the first."""
    folder = write_csv_images(tmp_path)
    (tmp_path / "train.csv").write_text("path,label,label\n0.png,red,blue\n1.png,green,red\n")
    with pytest.raises(UserError, match=r"train\.csv, line 1: column 'label' appears more than once"):
        image_csv.build(str(tmp_path / "train.csv"), str(folder))
    (tmp_path / "val.csv").write_text("path,path,label\n2.png,2.png,blue\n")
    (tmp_path / "train.csv").write_text("path,label\n0.png,red\n1.png,green\n")
    with pytest.raises(UserError, match=r"val\.csv, line 1: column 'path' appears more than once"):
        image_csv.build(str(tmp_path / "train.csv"), str(folder), val_csv=str(tmp_path / "val.csv"))


def test_image_csv_unknown_class_and_unreadable_image_name_the_line(tmp_path):
    folder = write_csv_images(tmp_path)
    (tmp_path / "train.csv").write_text("path,label\n0.png,red\n1.png,green\n2.png,blue\n")
    (tmp_path / "val.csv").write_text("path,label\n3.png,red\n4.png,purple\n")
    with pytest.raises(UserError, match=r"val\.csv, line 3: class 'purple' is not known; classes of the training CSV: "
                                        r"blue, green, red"):
        image_csv.build(str(tmp_path / "train.csv"), str(folder), val_csv=str(tmp_path / "val.csv"))
    (tmp_path / "val.csv").write_text("path,label\n3.png,red\n4.png,2\n")
    with pytest.raises(UserError, match=r"val\.csv, line 3: class '2' is not known"):
        image_csv.build(str(tmp_path / "train.csv"), str(folder), val_csv=str(tmp_path / "val.csv"))
    (folder / "1.png").write_bytes(b"\x89PNG broken")
    bundle = image_csv.build(str(tmp_path / "train.csv"), str(folder), image_size=16)
    with pytest.raises(UserError, match=r"train\.csv, line 3: cannot read image .*1\.png"):
        bundle.train[1]


def test_small_image_models_take_the_datas_channels():
    from runner.models.cifar_resnet import build as cifar_resnet
    from runner.models.small_cnn import SmallCNN

    resnet = cifar_resnet(num_outputs=10, in_channels=1)
    assert resnet.conv1.in_channels == 1 and resnet.conv1.stride == (1, 1) and isinstance(resnet.maxpool, torch.nn.Identity)
    x = torch.randn(2, 1, 28, 28)
    assert resnet(x).shape == (2, 10) and SmallCNN(num_outputs=7, in_channels=1)(x).shape == (2, 7)
    # The stem keeps the resolution: layer1 sees 28x28 (torchvision's own stem would give 7x7).
    assert resnet.layer1(resnet.relu(resnet.bn1(resnet.conv1(x)))).shape[-1] == 28
    with pytest.raises(UserError, match="needs a ResNet"):
        cifar_resnet(num_outputs=10, name="mobilenet_v2")

"""Multi-label datasets: shapes prevalences and determinism, every CSV loader error with the
file and line named, the balanced sampler, Fashion-MNIST mosaics where the files exist."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import WeightedRandomSampler
from torchvision.io import write_jpeg, write_png
from torchvision.transforms.v2.functional import resize

from runner.data import fashion_mosaic, multilabel_csv, shapes
from runner.data.sampling import rarest_label_weights, train_weights
from runner.engine import data as loaders
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
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8  # normalised after the copy to the device
    normalised, _ = bundle.train.to_device((image[None], labels[None]), torch.device("cpu"))
    expected = (image.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(normalised[0], expected)
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


def test_csv_column_named_twice_behind_a_byte_order_mark(tmp_path):
    """A BOM glued to the first name hid 'cat' twice: pandas strips it and reads 'cat.1' as a label."""
    folder = _image_folder(tmp_path, 2)
    (tmp_path / "bom.csv").write_text("\ufeffcat,path,cat\n0,0.png,1\n1,1.png,0\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bom\.csv, line 1: column 'cat' appears more than once"):
        multilabel_csv.build(csv=str(tmp_path / "bom.csv"), image_dir=str(folder))


def test_csv_unreadable_image_names_the_line(tmp_path):
    folder = _image_folder(tmp_path, 3)
    (folder / "2.png").write_bytes(b"this is not an image")
    bundle = multilabel_csv.build(csv=_csv(tmp_path / "train.csv", _rows(0, 3)), image_dir=str(folder))
    bundle.train[1]
    with pytest.raises(UserError, match=r"train.csv, line 4: cannot read image .*2.png"):
        bundle.train[2]


def jpeg_and_png_folder(tmp_path: Path, n: int, same_size: bool = False) -> tuple[Path, str]:
    """n smooth images (JPEG, every third a PNG) of various sizes and their CSV; returns (folder, csv)."""
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        h, w = (40, 48) if same_size else (36 + 5 * i, 60 - 2 * i)
        image = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 6, generator=g), size=(h, w), mode="bilinear")
        image = (image[0] * 255).round().to(torch.uint8)
        name = f"{i}.png" if i % 3 == 0 else f"{i}.jpg"
        (write_png if name.endswith(".png") else write_jpeg)(image, str(folder / name))
        rows.append(f"{name},{i % 2},{int(i % 3 == 0)},{int(i % 4 == 1)}")
    return folder, _csv(tmp_path / "train.csv", rows)


def _batches_on(dataset, batch_size: int, device: torch.device) -> list:
    loader = loaders.eval_loader(dataset, batch_size=batch_size, rank=0, world=1, prebatched=False)
    move = loaders.batch_mover(dataset, None, device)
    return [move(batch) for batch in loader]


def _batches(dataset, batch_size: int) -> list:
    return _batches_on(dataset, batch_size, torch.device("cpu"))


@pytest.mark.parametrize("same_size", [False, True], ids=["mixed-sizes", "one-size"])
def test_csv_decode_on_device_equals_workers_and_pillow(tmp_path, same_size):
    """decode=device (here on the CPU: one batched decode_jpeg call in the main process) gives the
    same batches as decode=cpu (each worker decodes its items), and both match an independent
    reference: Pillow's decode, the same antialiased resize, ImageNet normalisation by hand."""
    from PIL import Image

    folder, csv = jpeg_and_png_folder(tmp_path, 7, same_size)
    on_cpu = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=32, decode="cpu")
    on_device = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=32, decode="device")
    assert not on_cpu.train.on_device and on_device.train.on_device
    assert on_cpu.train[1][0].dtype == torch.uint8  # normalised on the device, after the copy
    assert on_device.train[1][0].dim() == 1 and on_device.train[0][0].shape == (3, 32, 32)  # JPEG bytes; PNG decoded
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    seen = 0
    for (a, labels_a), (b, labels_b) in zip(_batches(on_cpu.train, 3), _batches(on_device.train, 3)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert torch.equal(labels_a, labels_b) and a.dtype == torch.float32
        for image in a:
            opened = Image.open(folder / f"{seen}.{'png' if seen % 3 == 0 else 'jpg'}").convert("RGB")
            width, height = opened.size
            pillow = torch.tensor(list(opened.getdata()), dtype=torch.uint8).T.reshape(3, height, width)
            reference = (resize(pillow, [32, 32], antialias=True).float() / 255 - mean) / std
            # Pillow's libjpeg and torchvision's libjpeg-turbo may round an IDCT differently.
            assert (image - reference).abs().max() <= 3 / 255 / 0.225
            seen += 1
    assert seen == 7


def test_csv_decode_auto_follows_the_device_and_rejects_unknown_values(tmp_path):
    folder, csv = jpeg_and_png_folder(tmp_path, 3)
    def on_device(device: str, workers: int) -> bool:
        return multilabel_csv.build(csv=csv, image_dir=str(folder), device=torch.device(device),
                                    num_workers=workers).train.on_device

    assert not on_device("cpu", 0) and not on_device("cpu", 8)
    # On a GPU: nvJPEG unless there are enough CPU workers to keep up (benchmarks/README.md).
    assert on_device("cuda", 0) and on_device("cuda", 7) and not on_device("cuda", 8)
    with pytest.raises(UserError, match=r"dataset.decode='gpu' is not known; allowed: auto, cpu, device"):
        multilabel_csv.build(csv=csv, image_dir=str(folder), decode="gpu")


def test_csv_corrupt_jpeg_decoded_on_device_names_its_line(tmp_path):
    folder, csv = jpeg_and_png_folder(tmp_path, 5)
    (folder / "4.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG header and nothing else")
    bundle = multilabel_csv.build(csv=csv, image_dir=str(folder), image_size=16, decode="device")
    with pytest.raises(UserError, match=r"train.csv, line 6: cannot read image .*4.jpg"):
        _batches(bundle.train, 5)


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

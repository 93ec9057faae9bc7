"""Classification evaluation and predictions on files: 2 gloo processes give the metrics, the
tables and the predictions.csv of 1 process on splits of odd size; predictions on a folder of
unlabelled images (classification and multi-label) equal the model's own outputs; bad inputs (a
checkpoint of another family, other classes, an unreadable image) exit 2 with one line naming them."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from conftest import only_run_folder, rejected, run_cli, run_in_process
from test_classification_data import write_image_folder
from test_multilabel_data import jpeg_and_png_folder

DDP2 = ("device=ddp", "device.devices=2", "device.backend=gloo")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def settings(data, *extra, model=("model.width=8",)):
    # eval batches of 4: the shards (7 and 8 test images) end in batches of other sizes
    return ("experiment=classify", "dataset=imagefolder", f"dataset.root={data}", "dataset.image_size=16", *model,
            "trainer.batch_size=8", "trainer.eval_batch_size=4", "trainer.progress=none", *extra)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(image folder, folder of 7 unlabelled images, best.pt): 3 classes, val 9 and test 15 images."""
    root = tmp_path_factory.mktemp("classes")
    data = write_image_folder(root / "data", {"train": 12, "val": 3, "test": 5}, size=20)
    new = root / "new"
    for i, source in enumerate(sorted((data / "test").rglob("*.png"))[:7]):
        target = new / ("nested" if i % 2 else "") / f"img{i}.png"  # any depth is read
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    code, run_dir = run_in_process(root / "train", *settings(data, "device=cpu", "trainer.max_epochs=2"))
    assert code == 0, summary(run_dir)["error"]
    return data, new, run_dir / "checkpoints" / "best.pt"


@pytest.mark.slow  # about 20 s: two runs of two gloo processes each
def test_two_gloo_processes_give_the_metrics_tables_and_predictions_of_one(tmp_path, trained):
    data, new, ckpt = trained
    runs = {}
    for mode, extra in (("eval", ()), ("predict", (f"dataset.predict={new}",))):
        code, runs[mode, 1] = run_in_process(tmp_path / f"{mode}1", *settings(data, "device=cpu", f"mode={mode}",
                                                                              f"ckpt_path={ckpt}", *extra))
        assert code == 0, summary(runs[mode, 1])["error"]
        done = run_cli(*settings(data, *DDP2, f"mode={mode}", f"ckpt_path={ckpt}", *extra),
                       f"output_root={tmp_path / f'{mode}2'}")
        assert done.returncode == 0, done.stderr[-2000:]
        runs[mode, 2] = only_run_folder(tmp_path / f"{mode}2")
    one, two = summary(runs["eval", 1]), summary(runs["eval", 2])
    assert two["device"].startswith("ddp x2")
    assert one["eval_samples"] == two["eval_samples"] == {"val": 9, "test": 15}  # every image once
    assert one["metrics"].keys() == two["metrics"].keys()
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-6), key  # float32 sums in another order
    for table in ("confusion_matrix.csv", "confusion_matrix_val.csv", "per_class.csv"):
        assert (runs["eval", 2] / table).read_text() == (runs["eval", 1] / table).read_text(), table
    a = pd.read_csv(runs["predict", 1] / "predictions.csv")
    b = pd.read_csv(runs["predict", 2] / "predictions.csv")
    assert len(a) == 7 and list(b["sample"]) == list(a["sample"]) == sorted(str(p) for p in new.rglob("*.png"))
    assert list(b["predicted"]) == list(a["predicted"])
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert b[probs].to_numpy() == pytest.approx(a[probs].to_numpy(), rel=1e-5, abs=1e-6)


def test_predictions_on_unlabelled_images_are_the_models_outputs(tmp_path, trained):
    from runner.models.small_cnn import SmallCNN

    data, new, ckpt = trained
    code, run_dir = run_in_process(tmp_path, *settings(data, "device=cpu", "mode=predict", f"ckpt_path={ckpt}",
                                                       f"dataset.predict={new}", "trainer.num_workers=2"))
    assert code == 0, summary(run_dir)["error"]
    table = pd.read_csv(run_dir / "predictions.csv")
    model = SmallCNN(num_outputs=3, in_channels=3, width=8).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    images = torch.stack([F.normalize(F.to_dtype(F.resize(decode_image(path, mode=ImageReadMode.RGB), [16, 16]),
                                                 torch.float32, scale=True), MEAN, STD) for path in table["sample"]])
    with torch.no_grad():
        expected = torch.softmax(model(images), 1).numpy()
    assert table[["prob_blue", "prob_green", "prob_red"]].to_numpy() == pytest.approx(expected, abs=1e-5)
    assert list(table["predicted_index"]) == expected.argmax(1).tolist()
    assert list(table["predicted"]) == [("blue", "green", "red")[i] for i in expected.argmax(1)]
    assert "label" not in table  # new images: no labels, no score
    assert json.loads((run_dir / "summary.json").read_text())["predictions"]["metric"] == {}


def test_multilabel_predictions_on_unlabelled_images_and_its_checkpoint_refused_by_classification(tmp_path, trained):
    folder, csv = jpeg_and_png_folder(tmp_path, 12, same_size=True)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    split = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    (tmp_path / "all.csv").write_text("\n".join([lines[0] + ",split"] + [f"{l},{s}" for l, s in zip(lines[1:], split)]))
    common = ("experiment=focal_densenet", "dataset=multilabel_csv", f"dataset.csv={tmp_path / 'all.csv'}",
              f"dataset.image_dir={folder}", "dataset.split_column=split", "dataset.image_size=32",
              "model=torchvision", "model.name=mobilenet_v3_small", "trainer.batch_size=4", "trainer.max_steps=2",
              "device=cpu", "trainer.progress=none")
    code, run_dir = run_in_process(tmp_path / "train", *common)
    assert code == 0, summary(run_dir)["error"]
    ckpt = run_dir / "checkpoints" / "best.pt"
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(folder, unlabelled, ignore=shutil.ignore_patterns("*.csv", "1*"))  # 0, 2, ..., 9: 9 images
    code, run_dir = run_in_process(tmp_path / "predict", *common, "mode=predict", f"ckpt_path={ckpt}",
                                   f"dataset.predict={unlabelled}")
    assert code == 0, summary(run_dir)["error"]
    table = pd.read_csv(run_dir / "predictions.csv")
    assert list(table["sample"]) == sorted(str(p) for p in unlabelled.iterdir()) and len(table) == 9
    thresholds = torch.load(ckpt, weights_only=True)["family"]["thresholds"]
    for i, name in enumerate(("cat", "dog", "bird")):
        assert ((table[f"prob_{name}"] >= float(thresholds[i])).astype(int) == table[f"pred_{name}"]).all()
    # The same architecture with a head of the same size: the weights fit, the family does not.
    data, new, _ = trained
    same_network = ("model=torchvision", "model.name=mobilenet_v3_small")
    code, error = rejected(tmp_path / "cross", *settings(data, "device=cpu", "mode=predict", f"ckpt_path={ckpt}",
                                                         model=same_network))
    assert code == 2 and "the checkpoint was not trained by the classification family" in error and "\n" not in error


def test_other_classes_and_an_unreadable_image_exit_2_naming_them(tmp_path, trained):
    data, new, ckpt = trained
    other = tmp_path / "other"
    for colour in ("blue", "green", "purple"):
        (other / "train" / colour).mkdir(parents=True)
        for i in range(2):
            shutil.copy(data / "train" / "blue" / f"{i}.png", other / "train" / colour / f"{i}.png")
    code, error = rejected(tmp_path / "classes", *settings(other, "device=cpu", "mode=predict",
                                                           f"ckpt_path={ckpt}", "dataset.val_fraction=0.5"))
    assert code == 2
    assert error == "the checkpoint was trained on the classes blue, green, red; this data has blue, green, purple"
    broken = tmp_path / "broken"
    shutil.copytree(new, broken)
    (broken / "img3.png").write_bytes(b"\x89PNG not really")
    # Read by a DataLoader worker: the message comes back as the one line it was.
    code, error = rejected(tmp_path / "unreadable", *settings(data, "device=cpu", "mode=predict",
                                                              f"ckpt_path={ckpt}", f"dataset.predict={broken}",
                                                              "trainer.num_workers=2"))
    assert code == 2 and error.startswith(f"cannot read image {broken / 'img3.png'}: ") and "\n" not in error, error

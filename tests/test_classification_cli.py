"""Classification end to end: the classify preset (through runner.run, the command's run in process), an ImageFolder tree
written by the test, grey data into a torchvision model, and fashion_resnet's settings."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_in_process
from runner import run
from test_classification_data import write_image_folder

QUIET = ("trainer.progress=none", "device=cpu")


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow  # the whole preset (~3 min on 2 cores); tests/test_classification_predict.py trains the family
def test_classify_preset_end_to_end(tmp_path):
    result = run(["experiment=classify", *QUIET, f"output_root={tmp_path}"])  # the command's run, in process
    assert result["exit_code"] == 0, result.get("error")
    run_dir = Path(result["run_dir"])
    s = summary(run_dir)
    assert s["status"] == "completed" and s["eval_samples"] == {"val": 1000, "test": 2000}
    metrics = s["metrics"]
    assert metrics["test/accuracy"] > 0.8, metrics  # chance is 0.1
    for key in ("test/balanced_accuracy", "test/macro_f1", "test/top5_accuracy", "test/nll", "test/ece",
                "test/f1/ring", "val/accuracy"):
        assert key in metrics, key
    table = pd.read_csv(run_dir / "per_class.csv")
    assert len(table) == 10 and table["support"].sum() == 2000
    matrix = pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0)
    assert matrix.to_numpy().trace() / 2000 == pytest.approx(metrics["test/accuracy"])
    assert (run_dir / "plots" / "confusion_matrix.png").is_file() and (run_dir / "per_class_val.csv").is_file()


def test_an_image_folder_trains_and_beats_chance(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 24, "val": 6, "test": 8}, size=20)
    code, run_dir = run_in_process(tmp_path, "experiment=classify", "dataset=imagefolder", f"dataset.root={root}",
                                   "dataset.image_size=16", "model.width=8", "trainer.max_epochs=6",
                                   "trainer.batch_size=8", "trainer.eval_batch_size=32", *QUIET)
    assert code == 0, summary(run_dir)["error"]
    metrics = summary(run_dir)["metrics"]
    assert metrics["test/accuracy"] > 0.6, metrics  # chance is 1/3
    assert pd.read_csv(run_dir / "per_class.csv")["class"].tolist() == ["blue", "green", "red"]


def test_grey_data_into_a_torchvision_model(tmp_path):
    """resnet18 wants 3 channels: the family repeats the patterns' grey channel."""
    code, run_dir = run_in_process(tmp_path, "experiment=classify", "model=torchvision", "model.name=resnet18",
                                   "dataset.n_train=64", "dataset.n_val=32", "dataset.n_test=32",
                                   "trainer.max_steps=2", *QUIET)
    assert code == 0, summary(run_dir)["error"]
    assert summary(run_dir)["eval_samples"] == {"val": 32, "test": 32}


# bf16 (the preset's own precision) is what costs on a CPU: ~30 s for two ResNet steps, so that case
# runs with the slow tests; fp32 keeps the preset's model, optimizer and schedule in the default run.
@pytest.mark.parametrize("precision", ["32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_fashion_resnet_settings_run_on_a_small_set(tmp_path, precision):
    """The preset's model, optimizer, schedule and precision, on a few patterns instead of
    Fashion-MNIST (its own data would take minutes to evaluate on a CPU)."""
    code, run_dir = run_in_process(tmp_path, "experiment=fashion_resnet", "dataset=patterns", "dataset.n_train=64",
                                   "dataset.n_val=16", "dataset.n_test=16", "trainer.max_epochs=1",
                                   "trainer.batch_size=32", f"trainer.precision={precision}", *QUIET)
    s = summary(run_dir)
    assert code == 0, s["error"]
    assert s["steps"] == 2 and "val/accuracy" in s["metrics"]


def test_a_model_whose_outputs_do_not_fit_the_classes_is_a_user_error():
    import torch

    from runner.errors import UserError
    from runner.families.classification import ClassificationFamily
    from runner.losses.classification import softmax_cross_entropy

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    family = ClassificationFamily(model, softmax_cross_entropy(), [f"c{i}" for i in range(10)], [1] * 10)
    with pytest.raises(UserError, match=r"output \(2, 3\) does not fit the 10 classes of the data \(expected \(2, 10\)\)"):
        family.train_loss((torch.randn(2, 1, 2, 2), torch.tensor([0, 9])))

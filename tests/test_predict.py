"""mode=predict: predictions.csv, one row per sample in dataset order, equal to the model's own
outputs, the same under 2 processes as under 1, and bad checkpoints refused."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import only_run_folder, run_cli, run_in_process

FAST = ("experiment=regression", "device=cpu", "trainer.progress=none")


@pytest.fixture(scope="module")
def regression_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    code, run_dir = run_in_process(root, *FAST, "dataset.n_test=101")
    assert code == 0
    return run_dir / "checkpoints" / "best.pt"


def test_predictions_are_the_models_outputs_in_dataset_order(tmp_path, regression_ckpt):
    from runner.families.regression import mlp, synthetic

    code, run_dir = run_in_process(tmp_path, *FAST, "dataset.n_test=101", "mode=predict", f"ckpt_path={regression_ckpt}")
    assert code == 0
    table = pd.read_csv(run_dir / "predictions.csv")
    model = mlp(8, hidden=16)
    model.load_state_dict(torch.load(regression_ckpt, weights_only=True)["model"])
    x, _ = synthetic(n_train=256, n_val=64, n_test=101, dim=8, noise=0.1, seed=0).test.tensors
    with torch.no_grad():
        expected = model(x)[:, 0].numpy()
    assert list(table["sample"]) == list(range(101))
    assert table["prediction"].to_numpy() == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.slow  # DDP prediction; tests/test_distributed.py checks DDP evaluation
def test_two_processes_write_the_same_predictions(tmp_path, regression_ckpt):
    common = (*FAST[:1], "trainer.progress=none", "dataset.n_test=101", "trainer.eval_batch_size=16", "mode=predict",
              f"ckpt_path={regression_ckpt}")
    one = run_cli(*common, "device=cpu", f"output_root={tmp_path / 'one'}")
    two = run_cli(*common, "device=ddp", "device.devices=2", "device.backend=gloo", f"output_root={tmp_path / 'two'}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a = pd.read_csv(only_run_folder(tmp_path / "one") / "predictions.csv")
    b = pd.read_csv(only_run_folder(tmp_path / "two") / "predictions.csv")
    assert len(b) == 101 and list(b["sample"]) == list(range(101))  # each sample once, none missing
    assert b["prediction"].to_numpy() == pytest.approx(a["prediction"].to_numpy(), rel=1e-6)


def test_multilabel_predictions_use_the_thresholds_tuned_on_val(tmp_path):
    tiny = ("trainer.progress=none", "device=cpu", "dataset.n_train=128", "dataset.n_val=64", "dataset.n_test=50",
            "trainer.max_epochs=1", "trainer.batch_size=32")
    code, run_dir = run_in_process(tmp_path / "train", *tiny)
    assert code == 0
    ckpt = run_dir / "checkpoints" / "best.pt"
    thresholds = torch.load(ckpt, weights_only=True)["family"]["thresholds"]
    code, run_dir = run_in_process(tmp_path / "predict", *tiny, "mode=predict", f"ckpt_path={ckpt}")
    assert code == 0
    table = pd.read_csv(run_dir / "predictions.csv", keep_default_na=False)
    assert len(table) == 50
    labels = ("red_square", "green_disc", "blue_triangle", "yellow_cross")
    for i, name in enumerate(labels):
        probs = table[f"prob_{name}"]
        assert probs.between(0, 1).all()
        assert ((probs >= float(thresholds[i])).astype(int) == table[f"pred_{name}"]).all()
    # `predicted` names the labels decided positive; the test split's labels are beside them, and score the run.
    assert list(table["predicted"]) == ["|".join(n for n in labels if row[f"pred_{n}"]) for _, row in table.iterrows()]
    assert set(table[[f"label_{n}" for n in labels]].to_numpy().ravel()) <= {0, 1}
    trained = json.loads((ckpt.parent.parent / "summary.json").read_text())
    metric = json.loads((run_dir / "summary.json").read_text())["predictions"]["metric"]
    assert metric["mAP"] == pytest.approx(trained["metrics"]["test/mAP"])  # best.pt on the same test split


def test_density_predictions_and_a_checkpoint_of_another_family(tmp_path, regression_ckpt):
    small = ("experiment=iwae_silhouettes", "trainer.progress=none", "device=cpu", "dataset.n_train=200",
             "dataset.n_val=50", "dataset.n_test=30", "trainer.max_epochs=1", "loss.eval_k=10")
    code, run_dir = run_in_process(tmp_path / "train", *small)
    assert code == 0
    code, run_dir = run_in_process(tmp_path / "predict", *small, "mode=predict",
                                   f"ckpt_path={run_dir / 'checkpoints' / 'best.pt'}")
    assert code == 0
    table = pd.read_csv(run_dir / "predictions.csv")
    assert len(table) == 30 and (table["elbo"] <= table["bound_k5"] + 1e-4).all()
    code, run_dir = run_in_process(tmp_path / "other", *small, "mode=predict", f"ckpt_path={regression_ckpt}")
    assert code == 2


def test_classification_predictions_and_classes_that_differ(tmp_path):
    small = ("experiment=classify", "trainer.progress=none", "device=cpu", "dataset.n_train=300", "dataset.n_val=60",
             "dataset.n_test=41", "trainer.max_epochs=1")
    code, run_dir = run_in_process(tmp_path / "train", *small)
    assert code == 0
    ckpt = run_dir / "checkpoints" / "best.pt"
    code, run_dir = run_in_process(tmp_path / "predict", *small, "mode=predict", f"ckpt_path={ckpt}")
    assert code == 0
    table = pd.read_csv(run_dir / "predictions.csv")
    names = [c.removeprefix("prob_") for c in table.columns if c.startswith("prob_")]
    probs = table[[f"prob_{name}" for name in names]].to_numpy()
    assert len(table) == 41 and probs.shape[1] == 10
    assert probs.sum(1) == pytest.approx(1.0, abs=1e-4)
    assert (probs.argmax(1) == table["predicted_index"]).all() and table["probability"].to_numpy() == pytest.approx(probs.max(1))
    assert list(table["predicted"]) == [names[i] for i in table["predicted_index"]]  # the class named, beside its index
    # The test split has labels: the file holds them, and the run's end scores the predictions by them.
    assert list(table["label"]) == [names[i] for i in table["label_index"]]
    trained = json.loads((ckpt.parent.parent / "summary.json").read_text())
    predicted = json.loads((run_dir / "summary.json").read_text())["predictions"]
    assert predicted["rows"] == 41 and predicted["path"] == str(run_dir / "predictions.csv")
    assert predicted["metric"]["accuracy"] == pytest.approx((table["predicted"] == table["label"]).mean())
    assert predicted["metric"]["accuracy"] == pytest.approx(trained["metrics"]["test/accuracy"])  # best.pt, same split
    state = torch.load(ckpt, weights_only=True)
    state["family"]["class_names"] = ["other"] * 10
    torch.save(state, tmp_path / "renamed.pt")
    code, run_dir = run_in_process(tmp_path / "other", *small, "mode=predict", f"ckpt_path={tmp_path / 'renamed.pt'}")
    assert code == 2

"""Single-label metrics against scikit-learn, torchmetrics and hand counts, also when the sums
come from two uneven process shards; the files and the plot the family writes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                             precision_recall_fscore_support)
from torchmetrics.functional.classification import multiclass_calibration_error

from runner.families.classification import ClassificationFamily
from runner.losses.classification import softmax_cross_entropy
from runner.metrics.classification import batch_sums, classification_metrics

C = 12
NAMES = [f"c{i}" for i in range(C)]


def _data(n: int = 700, seed: int = 0, classes: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that are right more often than not, with uneven class frequencies."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.multinomial(torch.linspace(1, 3, classes), n, replacement=True, generator=g)
    logits = 2 * torch.randn(n, classes, generator=g)
    logits[torch.arange(n), targets] += 2.5 * torch.rand(n, generator=g)
    return logits, targets


def _metrics(logits, targets, names=NAMES):
    return classification_metrics(batch_sums(logits, targets, len(names)), names)


def test_metrics_match_sklearn():
    logits, targets = _data()
    metrics, table = _metrics(logits, targets)
    y, p = targets.numpy(), logits.argmax(1).numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=range(C), zero_division=0)
    assert table["precision"].tolist() == pytest.approx(precision.tolist())
    assert table["recall"].tolist() == pytest.approx(recall.tolist())
    assert table["f1"].tolist() == pytest.approx(f1.tolist())
    assert table["support"].tolist() == support.tolist()
    assert metrics["macro_precision"] == pytest.approx(precision.mean())
    for i, name in enumerate(NAMES):
        assert metrics[f"f1/{name}"] == pytest.approx(f1[i])
    assert batch_sums(logits, targets, C)["confusion"].tolist() == confusion_matrix(y, p, labels=range(C)).tolist()
    assert metrics["nll"] == pytest.approx(log_loss(y, F.softmax(logits.double(), 1).numpy(), labels=range(C)), rel=1e-6)


def test_an_absent_class_counts_as_sklearn_counts_it():
    """Class 3 never occurs and is never predicted; class 5 occurs but is never predicted."""
    logits, targets = _data(seed=1)
    keep = targets != 3
    logits, targets = logits[keep], targets[keep]
    logits[:, 3] = -1e4
    logits[:, 5] = -1e4
    metrics, table = _metrics(logits, targets)
    y, p = targets.numpy(), logits.argmax(1).numpy()
    assert 3 not in p and 5 not in p and 5 in y
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert metrics["macro_recall"] == pytest.approx(
        precision_recall_fscore_support(y, p, average="macro", zero_division=0)[1])
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert table.loc[5, "precision"] == 0 and table.loc[5, "recall"] == 0


def test_top5_against_a_hand_count_and_only_past_five_classes():
    logits, targets = _data(seed=2)
    order = np.argsort(-logits.numpy(), axis=1)
    hits = sum(int(t in row[:5]) for t, row in zip(targets.tolist(), order))
    assert _metrics(logits, targets)[0]["top5_accuracy"] == pytest.approx(hits / len(targets))
    few, few_targets = _data(seed=2, classes=5)
    assert "top5_accuracy" not in _metrics(few, few_targets, NAMES[:5])[0]


def test_ece_against_torchmetrics_and_a_hand_formula():
    logits, targets = _data(seed=3)
    ece = _metrics(logits, targets)[0]["ece"]
    reference = multiclass_calibration_error(F.softmax(logits, 1), targets, num_classes=C, n_bins=15, norm="l1")
    assert ece == pytest.approx(float(reference), abs=1e-6)
    probs = F.softmax(logits.double(), 1)
    confidence, predicted = probs.max(1)
    correct = (predicted == targets).double()
    bins = np.minimum((confidence.numpy() * 15).astype(int), 14)
    by_hand = sum(abs(correct.numpy()[bins == b].sum() - confidence.numpy()[bins == b].sum()) for b in range(15))
    assert ece == pytest.approx(by_hand / len(targets), abs=1e-6)
    # Perfectly confident and always right: no calibration error.
    assert _metrics(F.one_hot(targets, C) * 100.0, targets)[0]["ece"] == pytest.approx(0.0, abs=1e-6)


def _family() -> ClassificationFamily:
    return ClassificationFamily(torch.nn.Identity(), softmax_cross_entropy(), NAMES, list(range(C)))


def _evaluate_sharded(family, split, logits, targets, cuts):
    """One evaluator per 'process' over uneven shards, reduced as runner/engine/evaluate.py does."""
    evaluators = []
    for lo, hi in zip([0] + cuts, cuts + [len(targets)]):
        ev = family.evaluator(split)
        for start in range(lo, hi, 37):  # uneven batches too
            stop = min(start + 37, hi)
            ev.update((logits[start:stop], targets[start:stop]))
        evaluators.append(ev)
    assert all(not ev.rows for ev in evaluators)  # sums only
    sums = {k: sum(ev.sums[k] for ev in evaluators) for k in evaluators[0].sums}
    assert sum(ev.count for ev in evaluators) == len(targets)
    return evaluators[0].compute(sums, {})


def test_two_uneven_shards_give_the_single_process_metrics():
    logits, targets = _data(n=1001, seed=4)
    one = _evaluate_sharded(_family(), "test", logits, targets, cuts=[])
    two = _evaluate_sharded(_family(), "test", logits, targets, cuts=[388])
    assert one.keys() == two.keys()
    for key in one:
        # Counts are exact; the NLL, loss and ECE sums are float64 sums in another order.
        assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12), key
    assert one["loss"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-6)
    assert one["accuracy"] == pytest.approx(accuracy_score(targets.numpy(), logits.argmax(1).numpy()))


def test_family_writes_per_class_confusion_matrix_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    logits, targets = _data(seed=5)
    family = _family()
    for split in ("val", "test"):
        metrics = _evaluate_sharded(family, split, logits, targets, cuts=[100])
        family.after_evaluation(split, metrics, tmp_path)
    table = pd.read_csv(tmp_path / "per_class.csv")
    assert table["class"].tolist() == NAMES and table["train_count"].tolist() == list(range(C))
    y, p = targets.numpy(), logits.argmax(1).numpy()
    assert table["f1"].tolist() == pytest.approx(f1_score(y, p, average=None, labels=range(C), zero_division=0), abs=1e-6)
    matrix = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    assert matrix.columns.tolist() == NAMES and matrix.index.tolist() == NAMES
    assert matrix.to_numpy().tolist() == confusion_matrix(y, p, labels=range(C)).tolist()
    assert (tmp_path / "per_class_val.csv").is_file() and (tmp_path / "confusion_matrix_val.csv").is_file()
    png = tmp_path / "plots" / "confusion_matrix.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    family.after_evaluation("test", metrics, None)  # no run folder: nothing written, no error


@pytest.mark.parametrize("classes", [10, 100])
def test_confusion_plot_grows_with_the_classes_and_drops_cell_numbers(tmp_path, monkeypatch, classes):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from runner.report import plots

    logits, targets = _data(n=3000, seed=6, classes=classes)
    confusion = batch_sums(logits, targets, classes)["confusion"]
    texts, ticks = [], []
    original = plots.save

    def keep_texts(fig, path):
        texts.extend(t.get_text() for t in fig.axes[0].texts)
        ticks.extend(t.get_text() for t in fig.axes[0].get_yticklabels())
        return original(fig, path)

    monkeypatch.setattr(plots, "save", keep_texts)
    names = [f"class_{i}" for i in range(classes)]
    width, height = Image.open(plots.plot_confusion_matrix(confusion, names, tmp_path / "cm.png")).size
    assert ticks == names  # every class named, also at 100
    if classes == 10:
        assert len(texts) >= classes and 400 < width < 1400  # the cells carry their values
        diagonal = (confusion.diagonal().double() / confusion.sum(1)).tolist()
        assert all(f"{v:.2f}" in texts for v in diagonal)
    else:
        assert texts == [] and width > 1800 and height > 1800  # no numbers; ~18 px per class

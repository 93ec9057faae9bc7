"""Multi-label metrics against scikit-learn, also when the rows come from two uneven process
shards; threshold tuning against a brute-force search."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (average_precision_score, f1_score, multilabel_confusion_matrix,
                             precision_score, recall_score, roc_auc_score)

from runner.families.multilabel import MultiLabelFamily
from runner.losses.multilabel import bce
from runner.metrics.multilabel import multilabel_metrics, tune_thresholds

NAMES = ["a", "b", "c", "d"]


def _rows(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, 4, generator=g) < torch.tensor([0.05, 0.2, 0.5, 0.3])).float()
    logits = 1.5 * (2 * targets - 1) + 1.2 * torch.randn(n, 4, generator=g)
    probs = torch.sigmoid(logits)
    probs[:40, 1] = 0.5  # ties, and ties exactly at the threshold
    probs[40:60, 2] = probs[40, 2]
    return probs, targets


def test_metrics_match_sklearn():
    probs, targets = _rows()
    metrics, table = multilabel_metrics(probs, targets, NAMES)
    p, y = probs.numpy(), targets.numpy().astype(int)
    predicted = (p >= 0.5).astype(int)
    confusion = multilabel_confusion_matrix(y, predicted)  # [L, 2, 2]: tn fp / fn tp
    assert table["tp"].tolist() == confusion[:, 1, 1].tolist()
    assert table["fp"].tolist() == confusion[:, 0, 1].tolist()
    assert table["fn"].tolist() == confusion[:, 1, 0].tolist()
    assert table["tn"].tolist() == confusion[:, 0, 0].tolist()
    for i, name in enumerate(NAMES):
        assert metrics[f"precision/{name}"] == pytest.approx(precision_score(y[:, i], predicted[:, i], zero_division=0))
        assert metrics[f"recall/{name}"] == pytest.approx(recall_score(y[:, i], predicted[:, i], zero_division=0))
        assert metrics[f"f1/{name}"] == pytest.approx(f1_score(y[:, i], predicted[:, i], zero_division=0))
        assert metrics[f"ap/{name}"] == pytest.approx(average_precision_score(y[:, i], p[:, i]), abs=1e-6)
        assert metrics[f"auroc/{name}"] == pytest.approx(roc_auc_score(y[:, i], p[:, i]), abs=1e-6)
    assert metrics["mAP"] == pytest.approx(average_precision_score(y, p, average="macro"), abs=1e-6)
    assert metrics["macro_auroc"] == pytest.approx(roc_auc_score(y, p, average="macro"), abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    assert metrics["micro_f1"] == pytest.approx(f1_score(y, predicted, average="micro", zero_division=0))
    assert table["pred_pos_rate"].tolist() == pytest.approx(predicted.mean(0).tolist())
    assert table["prevalence"].tolist() == pytest.approx(y.mean(0).tolist())


def test_undefined_ap_and_auroc_are_nan_and_left_out_of_the_means():
    probs, targets = _rows()
    targets[:, 0] = 0
    metrics, _ = multilabel_metrics(probs, targets, NAMES)
    assert math.isnan(metrics["ap/a"]) and math.isnan(metrics["auroc/a"])
    p, y = probs.numpy(), targets.numpy()
    assert metrics["mAP"] == pytest.approx(np.mean([average_precision_score(y[:, i], p[:, i]) for i in (1, 2, 3)]))


def test_tuned_thresholds_maximise_f1_by_brute_force():
    probs, targets = _rows(seed=1)
    thresholds = tune_thresholds(probs, targets)
    p, y = probs.numpy(), targets.numpy().astype(int)
    for i in range(4):
        candidates = np.unique(p[:, i])
        best = max(f1_score(y[:, i], p[:, i] >= c, zero_division=0) for c in candidates)
        assert f1_score(y[:, i], p[:, i] >= float(thresholds[i]), zero_division=0) == pytest.approx(best)
    no_positive = targets.clone()
    no_positive[:, 3] = 0
    assert float(tune_thresholds(probs, no_positive)[3]) == 0.5


def _family() -> MultiLabelFamily:
    return MultiLabelFamily(torch.nn.Identity(), bce(), NAMES, [0.05, 0.2, 0.5, 0.3])


def _evaluate_sharded(family: MultiLabelFamily, split: str, probs: torch.Tensor, targets: torch.Tensor,
                      cuts: list[int]) -> dict[str, float]:
    """Run one evaluator per 'process' over uneven shards, reduce as the engine does."""
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    evaluators = []
    for lo, hi in zip([0] + cuts, cuts + [len(probs)]):
        ev = family.evaluator(split)
        for start in range(lo, hi, 37):  # uneven batches too
            stop = min(start + 37, hi)
            ev.update((logits[start:stop], targets[start:stop]))
        evaluators.append(ev)
    sums = {k: sum(ev.sums[k] for ev in evaluators) for k in evaluators[0].sums}
    rows = {k: torch.cat([torch.cat(ev.rows[k]) for ev in evaluators]) for k in evaluators[0].rows}
    assert sum(ev.count for ev in evaluators) == len(probs)
    return evaluators[0].compute(sums, rows)


def test_two_uneven_shards_give_the_single_process_metrics(tmp_path):
    probs, targets = _rows(n=301)
    single, sharded = _family(), _family()
    for split in ("val", "test"):
        one = _evaluate_sharded(single, split, probs, targets, cuts=[])
        two = _evaluate_sharded(sharded, split, probs, targets, cuts=[83])
        assert one.keys() == two.keys()
        for key in one:
            # Rows give exact metrics; the loss is a float32 sum per batch, equal to rounding.
            tolerance = {"rel": 1e-6} if key == "loss" else {"abs": 1e-12}
            assert two[key] == pytest.approx(one[key], nan_ok=True, **tolerance), key
    assert torch.equal(single.thresholds, sharded.thresholds)


def test_family_tunes_on_val_applies_on_test_and_writes_per_class(tmp_path):
    val_probs, val_targets = _rows(seed=2)
    test_probs, test_targets = _rows(seed=3)
    family = _family()
    test_first = _evaluate_sharded(family, "test", test_probs, test_targets, cuts=[])
    family.after_evaluation("test", test_first, tmp_path)
    import pandas as pd
    assert (pd.read_csv(tmp_path / "per_class.csv")["threshold_source"].str.startswith("0.5")).all()

    val = _evaluate_sharded(family, "val", val_probs, val_targets, cuts=[])
    assert not any("_tuned" in k for k in val)
    test = _evaluate_sharded(family, "test", test_probs, test_targets, cuts=[100])
    for key in ("mAP", "macro_f1", "micro_f1", "loss", "macro_f1_tuned", "micro_f1_tuned", "f1_tuned/a",
                "recall/b", "precision/c", "ap/d"):
        assert isinstance(test[key], float), key
    expected = tune_thresholds(val_probs, val_targets)
    p, y = test_probs.numpy(), test_targets.numpy().astype(int)
    tuned_predictions = p >= expected.numpy()
    assert test["macro_f1_tuned"] == pytest.approx(f1_score(y, tuned_predictions, average="macro", zero_division=0))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.logit(test_probs.clamp(1e-6, 1 - 1e-6)), test_targets)
    assert test["loss"] == pytest.approx(float(loss), rel=1e-5)

    family.after_evaluation("val", val, tmp_path)
    family.after_evaluation("test", test, tmp_path)
    table = pd.read_csv(tmp_path / "per_class.csv")
    assert table["label"].tolist() == NAMES
    assert (table["threshold_source"] == "val").all()
    assert table["threshold_tuned"].tolist() == pytest.approx(expected.tolist())
    for column in ("tp", "fp", "fn", "precision", "recall", "f1", "ap", "auroc", "pred_pos_rate", "prevalence",
                   "train_prevalence", "f1_tuned", "recall_tuned", "pred_pos_rate_tuned"):
        assert column in table.columns, column
    assert (tmp_path / "per_class_val.csv").exists()
    family.after_evaluation("test", test, None)  # no run folder (unit tests): nothing written, no error

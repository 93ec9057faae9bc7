"""Imbalanced multi-label image classification (DenseNet121 with an N-label head).

* ``train_loss``: one model call, the configured loss (runner/losses/multilabel.py) per sample,
  summed; its label weights come from the training label counts, passed to the loss builder as
  ``pos_counts`` and ``num_samples`` (and ``label_names``, for its warnings).
* Evaluation keeps the rows (probabilities, targets), so AP and AUROC are exact under any number
  of processes (runner/metrics/multilabel.py).
* Thresholds: computing ``val`` tunes one threshold per label (max F1) and keeps it; ``test`` then
  reports its scores at 0.5 and at those thresholds (``*_tuned``). A test evaluated before any val
  uses 0.5 for both and says so in per_class.csv (``threshold_source``).
* ``after_evaluation`` writes ``per_class.csv`` (test) and ``per_class_val.csv`` (val): one row
  per label with prevalence, predicted-positive rate, TP/FP/FN/TN, precision, recall, F1, AP,
  AUROC, at 0.5 and at the tuned thresholds; after the test, ``plots/pr_curves.png``: each label's
  precision-recall curve with its points at 0.5 and at the val-tuned threshold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from runner.report import plots
from runner.config.build import build as build_node
from runner.engine.family import DataBundle, Evaluator, Family
from runner.errors import UserError
from runner.families.classification import split_batch
from runner.config.compat import Accepts
from runner.families.first_batch import check_first_batch, check_fits
from runner.metrics.multilabel import multilabel_metrics, tune_thresholds

# Any image classifier fits: runner's torchvision and timm options, small_cnn and cifar_resnet for
# small images, or a user's module that maps a batch of images to one logit per label.
ACCEPTS = Accepts(datasets=("runner.data.shapes.", "runner.data.multilabel_csv.", "runner.data.fashion_mosaic."),
                  models=("runner.models.torchvision_models.", "runner.models.timm_models.",
                          "runner.models.small_cnn.", "runner.models.cifar_resnet."),
                  losses=("runner.losses.multilabel.",))


class MultiLabelEvaluator(Evaluator):
    def __init__(self, family: "MultiLabelFamily", split: str) -> None:
        super().__init__()
        self.family, self.split = family, split

    def update(self, batch: Any) -> None:
        images, targets = batch
        logits = self.family.raw_model(images).float()
        check_outputs(logits, targets, self.family.label_names)
        self.add_sum("loss", self.family.loss(logits, targets).sum())
        self.add_rows("probs", torch.sigmoid(logits))
        self.add_rows("targets", targets.float())
        self.count += images.shape[0]

    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        return self.family.metrics_of(self.split, sums, rows)


class MultiLabelFamily(Family):
    def __init__(
        self, model: nn.Module, loss: nn.Module, label_names: list[str], train_prevalence: list[float]
    ) -> None:
        self.model, self.loss = model, loss
        self.label_names = label_names
        self.train_prevalence = train_prevalence
        self.thresholds: Tensor | None = None  # tuned on val, applied on test
        self.tables: dict[str, pd.DataFrame] = {}
        self.test_rows: tuple[Tensor, Tensor] | None = None  # (probs, targets) of the last test, for its plot

    def train_loss(self, batch: Any) -> tuple[Tensor, int]:
        images, targets = batch
        logits = self.model(images)
        check_outputs(logits, targets, self.label_names)
        return self.loss(logits, targets).sum(), images.shape[0]

    def evaluator(self, split: str) -> Evaluator:
        return MultiLabelEvaluator(self, split)

    def check_output(self, batch: Any) -> None:
        images, targets = batch
        check_outputs(self.raw_model(images), targets, self.label_names)

    def predict(self, batch: Any) -> dict[str, Tensor]:
        """mode=predict: each label's probability and its decision at the val-tuned threshold,
        and its true value where the data have labels (the test split; not a folder of new images)."""
        images, targets = split_batch(batch)
        probs = torch.sigmoid(self.raw_model(images).float())
        thresholds = self.thresholds.to(probs.device) if self.thresholds is not None else torch.full_like(probs[0], 0.5)
        columns = {f"prob_{name}": probs[:, i] for i, name in enumerate(self.label_names)}
        columns.update({f"pred_{name}": (probs[:, i] >= thresholds[i]).int() for i, name in enumerate(self.label_names)})
        if targets is not None:
            columns.update({f"label_{name}": targets[:, i] for i, name in enumerate(self.label_names)})
        return columns

    def prediction_table(self, columns: dict[str, Tensor]) -> dict[str, Any]:
        """predictions.csv's columns: first ``predicted``, the names of the labels decided
        positive (``|``-separated, empty for none), then the per-label columns as 0/1 integers
        (``pred_*``, ``label_*``) and probabilities (``prob_*``)."""
        decided = torch.stack([columns[f"pred_{name}"].reshape(-1) for name in self.label_names], 1).bool()
        table: dict[str, Any] = {"predicted": ["|".join(n for n, on in zip(self.label_names, row) if on)
                                               for row in decided.tolist()]}
        for name, values in columns.items():
            table[name] = values if name.startswith("prob_") else values.reshape(-1).long()
        return table

    def prediction_metric(self, columns: dict[str, Tensor]) -> dict[str, float]:
        """The mAP of the probabilities where the data have labels (as the test evaluation computes it)."""
        if f"label_{self.label_names[0]}" not in columns:
            return {}
        probs = torch.stack([columns[f"prob_{name}"].reshape(-1) for name in self.label_names], 1)
        targets = torch.stack([columns[f"label_{name}"].reshape(-1) for name in self.label_names], 1)
        return {"mAP": multilabel_metrics(probs, targets, self.label_names)[0]["mAP"]}

    def state_dict(self) -> dict[str, Any]:
        """The thresholds tuned on val (a checkpoint carries them to mode=predict) and the labels."""
        return {"label_names": list(self.label_names),
                **({"thresholds": self.thresholds.clone()} if self.thresholds is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "class_names" in state:  # weights that fit, but of a single-label classifier
            raise UserError("the checkpoint was trained by the classification family (one class per image), not the "
                            "multilabel family; predict with a classification dataset")
        if state.get("label_names") and list(state["label_names"]) != list(self.label_names):
            raise UserError(f"the checkpoint was trained on the labels {', '.join(state['label_names'])}; this data "
                            f"has {', '.join(self.label_names)}")
        if "thresholds" in state:
            self.thresholds = state["thresholds"].float().cpu()

    def metrics_of(self, split: str, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        probs, targets = rows["probs"].cpu(), rows["targets"].cpu()
        if split == "val":
            self.thresholds = tune_thresholds(probs, targets)
            metrics, table = multilabel_metrics(probs, targets, self.label_names, self.thresholds)
            # Scores at thresholds tuned on these very rows are optimistic: keep them in the
            # table, report only the test ones as metrics.
            metrics = {k: v for k, v in metrics.items() if "_tuned" not in k}
            table["threshold_source"] = "tuned on val (in-sample)"
        else:
            tuned = self.thresholds if self.thresholds is not None else torch.full((len(self.label_names),), 0.5)
            metrics, table = multilabel_metrics(probs, targets, self.label_names, tuned)
            table["threshold_source"] = "val" if self.thresholds is not None else "0.5 (no val evaluated before)"
            self.test_rows = (probs, targets)
        table.insert(2, "train_prevalence", self.train_prevalence)
        self.tables[split] = table
        metrics["loss"] = float(sums["loss"]) / max(len(targets), 1)
        return metrics

    def after_evaluation(self, split: str, metrics: dict[str, float], run_dir: Path | None) -> None:
        if run_dir is None or split not in self.tables:
            return
        name = "per_class.csv" if split == "test" else f"per_class_{split}.csv"
        self.tables[split].to_csv(Path(run_dir) / name, index=False, float_format="%.6g")
        if split == "test" and self.test_rows is not None:
            plots.draw_safely("plots/pr_curves.png", plots.plot_pr_curves, *self.test_rows, self.label_names,
                              self.thresholds, Path(run_dir) / "plots" / "pr_curves.png")


def check_outputs(logits: Any, targets: Tensor, label_names: list[str]) -> None:
    """One clear message for a model whose output does not fit the labels."""
    n = len(label_names)
    check_fits(logits, tuple(targets.shape), f"the {n} labels of the data",
               f"give the model {n} outputs (float logits), e.g. model.num_classes={n}, or use model=torchvision")


def label_counts(train_labels: Tensor) -> tuple[list[int], int]:
    """(positives per label, number of training samples): what the loss builders weight with."""
    return [int(c) for c in train_labels.sum(0).round().tolist()], int(train_labels.shape[0])


def build(bundle: DataBundle, model: Any, loss: Any, seed: int = 0) -> MultiLabelFamily:
    info = bundle.info
    pos_counts, num_samples = label_counts(info["train_labels"])
    model = build_node(model, "model", num_outputs=info["num_labels"])
    loss = build_node(loss, "loss", pos_counts=pos_counts, num_samples=num_samples,
                      label_names=list(info["label_names"]))
    family = MultiLabelFamily(model, loss, list(info["label_names"]), [float(p) for p in info["prevalence"]])
    return check_first_batch(family, bundle)

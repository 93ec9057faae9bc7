"""Single-label image classification: C classes, one per image, any image classifier.

* ``train_loss``: one model call, the configured loss (runner/losses/classification.py) per
  sample, summed; the class-weighted losses get the training class counts (``class_counts``)
  and ``class_names`` from the bundle.
* Models: ``num_outputs`` (C) and, where the model's signature names it, ``in_channels`` come
  from the data. A model that does not take ``in_channels`` (torchvision, timm) and whose first
  convolution wants 3 channels gets grey (1-channel) images repeated to 3 channels, as a view at
  batch time: the data stay 1-channel (a third of the memory on the device), and ImageNet
  weights see grey images the way they are usually fed to them.
* Evaluation keeps sums only (runner/metrics/classification.py): the confusion matrix, the NLL,
  top-5 hits and calibration bins, so the metrics are exact under any number of processes.
* ``after_evaluation`` writes ``per_class.csv`` and ``confusion_matrix.csv`` (test), the same
  with ``_val`` (val), and after the test ``plots/confusion_matrix.png`` (normalised by true
  class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from runner.report import plots
from runner.config.build import build as build_node
from runner.config.compat import Accepts
from runner.engine.family import DataBundle, Evaluator, Family
from runner.errors import UserError
from runner.families.first_batch import check_first_batch, check_fits
from runner.metrics.classification import batch_sums, classification_metrics, confusion_frame

ACCEPTS = Accepts(datasets=("runner.data.patterns.", "runner.data.imagefolder.", "runner.data.image_csv.",
                            "runner.data.mnist_classes."),
                  models=("runner.models.torchvision_models.", "runner.models.timm_models.",
                          "runner.models.small_cnn.", "runner.models.cifar_resnet."),
                  losses=("runner.losses.classification.",))


class ClassificationEvaluator(Evaluator):
    def __init__(self, family: "ClassificationFamily", split: str) -> None:
        super().__init__()
        self.family, self.split = family, split

    def update(self, batch: Any) -> None:
        images, targets = batch
        logits = self.family.logits(self.family.raw_model, images, targets).float()
        for name, value in batch_sums(logits, targets, len(self.family.class_names)).items():
            self.add_sum(name, value)
        self.add_sum("loss", self.family.loss(logits, targets).double().sum())
        self.count += images.shape[0]

    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        return self.family.metrics_of(self.split, sums)


class ClassificationFamily(Family):
    def __init__(self, model: nn.Module, loss: nn.Module, class_names: list[str], class_counts: list[int],
                 repeat_grey: bool = False) -> None:
        self.model, self.loss = model, loss
        self.class_names, self.class_counts = class_names, class_counts
        self.repeat_grey = repeat_grey
        self.tables: dict[str, tuple[pd.DataFrame, Tensor]] = {}  # split -> (per-class table, confusion)

    def logits(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        if self.repeat_grey:
            images = images.expand(-1, 3, -1, -1)
        logits = model(images)
        check_outputs(logits, targets, len(self.class_names))
        return logits

    def train_loss(self, batch: Any) -> tuple[Tensor, int]:
        images, targets = batch
        return self.loss(self.logits(self.model, images, targets), targets).sum(), images.shape[0]

    def evaluator(self, split: str) -> Evaluator:
        return ClassificationEvaluator(self, split)

    def check_output(self, batch: Any) -> None:
        self.logits(self.raw_model, *batch)  # checks the output

    def predict(self, batch: Any) -> dict[str, Tensor]:
        """mode=predict: the predicted class, its probability, every class's probability, and the
        true class where the data have labels (the test split; not a folder of new images)."""
        images, targets = split_batch(batch)
        if self.repeat_grey:
            images = images.expand(-1, 3, -1, -1)
        probs = torch.softmax(self.raw_model(images).float(), dim=1)
        confidence, predicted = probs.max(dim=1)
        return {"predicted_index": predicted, "probability": confidence,
                **({"label_index": targets} if targets is not None else {}),
                **{f"prob_{name}": probs[:, c] for c, name in enumerate(self.class_names)}}

    def prediction_table(self, columns: dict[str, Tensor]) -> dict[str, Any]:
        """predictions.csv's columns: the class names beside their indices (``predicted``,
        ``predicted_index``; ``label``, ``label_index`` where the data have labels)."""
        table: dict[str, Any] = {}
        for name, values in columns.items():
            if name.endswith("_index"):
                indices = values.reshape(-1).long()
                table[name.removesuffix("_index")] = [self.class_names[i] for i in indices.tolist()]
                values = indices
            table[name] = values
        return table

    def prediction_metric(self, columns: dict[str, Tensor]) -> dict[str, float]:
        """The accuracy of the predictions where the data have labels."""
        if "label_index" not in columns or not len(columns["label_index"]):
            return {}
        return {"accuracy": float((columns["predicted_index"] == columns["label_index"]).double().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "class_names" not in state:  # weights that fit, but of another family (a multi-label head)
            raise UserError(f"the checkpoint was not trained by the classification family (its family state holds "
                            f"{', '.join(sorted(state))}); predict with the dataset of its own family")
        if state.get("class_names") and list(state["class_names"]) != list(self.class_names):
            raise UserError(f"the checkpoint was trained on the classes {', '.join(state['class_names'])}; this "
                            f"data has {', '.join(self.class_names)}")

    def metrics_of(self, split: str, sums: dict[str, Tensor]) -> dict[str, float]:
        metrics, table = classification_metrics(sums, self.class_names)
        table.insert(2, "train_count", self.class_counts)
        self.tables[split] = (table, sums["confusion"])
        metrics["loss"] = float(sums["loss"]) / max(float(sums["confusion"].sum()), 1)
        return metrics

    def after_evaluation(self, split: str, metrics: dict[str, float], run_dir: Path | None) -> None:
        if run_dir is None or split not in self.tables:
            return
        table, confusion = self.tables[split]
        suffix = "" if split == "test" else f"_{split}"
        table.to_csv(Path(run_dir) / f"per_class{suffix}.csv", index=False, float_format="%.6g")
        confusion_frame(confusion, self.class_names).to_csv(Path(run_dir) / f"confusion_matrix{suffix}.csv")
        if split == "test":
            plots.draw_safely("plots/confusion_matrix.png", plots.plot_confusion_matrix, confusion, self.class_names,
                              Path(run_dir) / "plots" / "confusion_matrix.png")


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(images, targets or None): a batch of new images has no labels."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def check_outputs(logits: Any, targets: Tensor, num_classes: int) -> None:
    """One clear message for a model whose output does not fit the classes."""
    check_fits(logits, (targets.shape[0], num_classes), f"the {num_classes} classes of the data",
               f"give the model {num_classes} outputs (float logits), e.g. model.num_classes={num_classes}, or use "
               "model=torchvision")


def first_conv_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution (None: it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def build(bundle: DataBundle, model: Any, loss: Any, seed: int = 0) -> ClassificationFamily:
    info = bundle.info
    names, channels = list(info["class_names"]), int(info["channels"])
    model = build_node(model, "model", num_outputs=info["num_classes"], in_channels=channels)
    wanted = first_conv_channels(model)
    repeat_grey = channels == 1 and wanted == 3
    if wanted is not None and wanted != channels and not repeat_grey:
        raise UserError(f"the model's first convolution takes {wanted} channels; the data have {channels}")
    loss = build_node(loss, "loss", class_counts=list(info["class_counts"]), class_names=names)
    return check_first_batch(ClassificationFamily(model, loss, names, list(info["class_counts"]), repeat_grey), bundle)

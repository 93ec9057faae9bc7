"""The one small interface through which a model family plugs into the engine.

The engine knows nothing about images, latent variables or text. A family gives it:

* a model (``Family.model``),
* ``train_loss(batch)``: the *sum* of per-unit losses over the batch and the number of units
  (samples, or tokens for a language model). The engine adds these up over the micro-batches
  of an optimizer step and divides the gradients by the total count, which is what makes
  accumulation exact (README.md, "Engine guarantees").
* ``evaluator(split)``: an object that sees every evaluation batch of a split and keeps only
  additive state: ``sums`` (reduced by summing across processes) and ``rows`` (per-sample
  tensors, concatenated across processes). ``compute()`` turns the reduced state into metrics.
  Because the state is additive and every sample is seen exactly once, metrics under N
  processes equal the single-process metrics.
* optional hooks: ``on_train_epoch_start`` (reset carried state), ``after_evaluation`` (write
  family extras such as ``per_class.csv`` or ``samples.txt``), ``check_output`` (the model's
  output fits the targets: run once on the first training samples, as the family is built).
* optionally, ``train_loss`` in parts (subclass ``StepInParts``), which lets jobs of the same shapes train fused as
  one batched model (runner/engine/fused.py): ``train_inputs(batch)`` makes every random draw
  of the step (from ``generator``: None is the global RNG, a fused job has its own),
  ``forward(model, inputs)`` is the model call (no randomness; fused, it runs under
  ``torch.func.vmap``), ``loss_sum(outputs, inputs)`` the loss sum, ``units(inputs)`` the unit
  count (from shapes: a Python int, no device read), and, for a recurrent model,
  ``carried(outputs)`` / ``keep(carried)``: the state the next step starts from (fused, each job
  keeps its own slice). The family's module then says which of its jobs fuse:
  ``fusion_blocker(model, loss)`` (None, or why not).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass
class DataBundle:
    """What a dataset builder returns: the splits and what the family needs to know about them."""

    family: str  # "multilabel" | "density" | "charlm"
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    info: dict[str, Any] = field(default_factory=dict)
    # Optional per-sample weights for a WeightedRandomSampler over `train` (balanced sampling).
    train_weights: Tensor | None = None
    # When set, the dataset's items are whole batches already in their required order
    # (char-LM streams): the engine must not shuffle or re-batch them.
    prebatched: bool = False
    # Unlabelled data that mode=predict predicts instead of the test split (dataset.predict).
    predict: Dataset | None = None


class Evaluator(ABC):
    """Additive evaluation state. Subclasses implement ``update`` and ``compute``."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.rows: dict[str, list[Tensor]] = {}
        self.count = 0  # samples seen by this process

    def add_sum(self, name: str, value: Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add_rows(self, name: str, value: Tensor) -> None:
        self.rows.setdefault(name, []).append(value.detach())

    @abstractmethod
    def update(self, batch: Any) -> None:
        """Add one evaluation batch (already on the device) to the state."""

    @abstractmethod
    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        """Metrics from the state reduced over all processes (rows concatenated, on the CPU)."""


class Family(ABC):
    """Base class of the families (runner/families/); see the module docstring."""

    model: nn.Module
    # Name of the unit that train_loss counts ("samples" or "tokens"), for logs and summary.
    unit: str = "samples"
    # Where train_inputs draws its randomness: None, the global RNG (a run alone); a fused job
    # has its own, and ``rng_at_build``, the global RNG states as it was built, which its
    # checkpoints hold as a run alone's would (runner/engine/fused.py).
    generator: torch.Generator | None = None
    rng_at_build: dict[str, Any] | None = None

    @property
    def raw_model(self) -> nn.Module:
        """The model without the engine's wrappers (DistributedDataParallel, torch.compile)."""
        model = self.model
        while hasattr(model, "module") or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or getattr(model, "_orig_mod")
        return model

    def to(self, device: torch.device) -> "Family":
        """Move the model and every other module the family holds (loss buffers) to ``device``."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        self.device = device
        return self

    @abstractmethod
    def train_loss(self, batch: Any) -> tuple[Tensor, int | Tensor]:
        """(sum of per-unit losses over the batch, number of units in the batch)."""

    @abstractmethod
    def evaluator(self, split: str) -> Evaluator:
        """A fresh evaluator for one pass over ``split``."""

    def on_train_epoch_start(self, epoch: int) -> None:
        """Reset state carried across batches (e.g. an LSTM's hidden state)."""

    def check_output(self, batch: Any) -> None:
        """Raise UserError where the model's output on ``batch`` (the first training samples, on
        the CPU) does not fit the targets; runner's families run it once as they are built
        (runner/families/first_batch.py)."""

    def after_evaluation(self, split: str, metrics: dict[str, float], run_dir: Path | None) -> None:
        """Write family extras (per_class.csv, samples.txt, plots). Called on rank 0 only."""


FamilyBuilder = Callable[..., Family]
BatchIterable = Iterable[Any]


class StepInParts(Family):
    """A family whose training step comes in parts (see the module docstring): the engine's
    ``train_loss`` is built from them, and fused jobs (runner/engine/fused.py) call them apart."""

    # trainer.compile (one process): model_and_loss compiled as one function (runner/engine/run.py
    # make_trainer), so that the loss's small elementwise kernels fuse with the model's.
    compiled_model_and_loss: Callable[[Any, Any], tuple[Tensor, tuple[Tensor, ...]]] | None = None
    # Why this job's step cannot be compiled (then trainer.compile leaves it eager, with a warning).
    compile_blocker: str | None = None

    def train_loss(self, batch: Any) -> tuple[Tensor, int | Tensor]:
        inputs = self.train_inputs(batch)
        loss_sum, carried = (self.compiled_model_and_loss or self.model_and_loss)(self.model, inputs)
        self.keep(carried)
        return loss_sum, self.units(inputs)

    def model_and_loss(self, model: Any, inputs: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The step's deterministic part: the loss sum and the state carried to the next step."""
        outputs = self.forward(model, inputs)
        return self.loss_sum(outputs, inputs), self.carried(outputs)

    @abstractmethod
    def train_inputs(self, batch: Any) -> Any:
        """Every random draw of the step, from ``generator``, with the batch."""

    @abstractmethod
    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model call: no randomness (fused, it runs under ``torch.func.vmap``)."""

    @abstractmethod
    def loss_sum(self, outputs: Any, inputs: Any) -> Tensor:
        """The sum of per-unit losses."""

    @abstractmethod
    def units(self, inputs: Any) -> int:
        """The unit count, from shapes: a Python int, no device read."""

    def carried(self, outputs: Any) -> tuple[Tensor, ...]:
        """The tensors of ``outputs`` that the next step starts from (a recurrent state); none."""
        return ()

    def keep(self, carried: tuple[Tensor, ...]) -> None:
        """Hold ``carried`` for the next step (in place, so that a captured step carries it too)."""

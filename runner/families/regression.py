"""The smallest family: regression with a mean-squared error. It exists to test the engine
(exact accumulation, resume, devices) on a model whose arithmetic is easy to check, and as the
example of what a new family has to provide."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from runner.config.build import Count, Size, build as build_node, plain
from runner.engine.family import DataBundle, Evaluator, StepInParts
from runner.config.compat import Accepts
from runner.families.first_batch import check_first_batch, check_fits
from runner.losses.regression import SquaredError

ACCEPTS = Accepts(datasets=("runner.families.regression.synthetic",), models=("runner.families.regression.mlp",),
                  losses=("runner.losses.regression.",))


def synthetic(n_train: Count = 256, n_val: Count = 64, n_test: Count = 64, dim: Size = 8, noise: float = 0.1,
              seed: int = 0) -> DataBundle:
    """y = x @ w + noise, with w and x drawn from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, 1, generator=g)

    def split(n: int) -> TensorDataset | None:
        if n == 0:
            return None
        x = torch.randn(n, dim, generator=g)
        return TensorDataset(x, x @ w + noise * torch.randn(n, 1, generator=g))

    return DataBundle("regression", split(n_train), split(n_val), split(n_test), info={"dim": dim})


def mlp(dim: int, hidden: Size = 16, batchnorm: bool = False) -> nn.Module:
    norm = [nn.BatchNorm1d(hidden)] if batchnorm else []
    return nn.Sequential(nn.Linear(dim, hidden), *norm, nn.Tanh(), nn.Linear(hidden, 1))


class MSEEvaluator(Evaluator):
    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def update(self, batch: Any) -> None:
        x, y = batch
        prediction = self.model(x).float()
        self.add_sum("squared_error", self.loss(prediction, y).sum())
        self.add_rows("prediction", prediction)
        self.count += x.shape[0]

    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        # The rows, gathered without padding, count the samples; how many there were is
        # summary.json's eval_samples, not a metric.
        return {"loss": float(sums["squared_error"]) / rows["prediction"].shape[0]}


class RegressionFamily(StepInParts):
    def __init__(self, model: nn.Module, loss: nn.Module | None = None):
        self.model, self.loss = model, loss or SquaredError()

    # A training step in three parts (runner/engine/family.py); no random draws here.
    def train_inputs(self, batch: Any) -> Any:
        return batch

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        return model(inputs[0])

    def loss_sum(self, outputs: Tensor, inputs: Any) -> Tensor:
        return self.loss(outputs, inputs[1]).sum()

    def units(self, inputs: Any) -> int:
        return inputs[0].shape[0]

    def evaluator(self, split: str) -> Evaluator:
        return MSEEvaluator(self.raw_model, self.loss)

    def check_output(self, batch: Any) -> None:
        x, y = batch
        check_fits(self.forward(self.raw_model, (x, y)), tuple(y.shape), "the targets",
                   "the model needs one output per target column, shaped like the targets")

    def predict(self, batch: Any) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return {"prediction": self.raw_model(x).float().flatten(1)[:, 0]}


def fusion_blocker(model: Any, loss: Any) -> str | None:
    """Regression jobs fuse (runner/engine/fused.py) unless BatchNorm keeps statistics per job."""
    return "model.batchnorm=true does not fuse" if plain(model).get("batchnorm") else None


def build(bundle: DataBundle, model: Any, loss: Any, seed: int = 0) -> RegressionFamily:
    family = RegressionFamily(build_node(model, "model", dim=bundle.info["dim"]), build_node(loss, "loss"))
    return check_first_batch(family, bundle)

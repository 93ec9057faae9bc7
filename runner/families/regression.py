"""The smallest family: regression with a mean-squared error. It exists to test the engine
(exact accumulation, resume, devices) on a model whose arithmetic is easy to check, and as the
example of what a new family has to provide."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from runner.build import build as build_node
from runner.engine.family import DataBundle, Evaluator, Family


def synthetic(n_train: int = 256, n_val: int = 64, n_test: int = 64, dim: int = 8, noise: float = 0.1,
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


def mlp(dim: int, hidden: int = 16, batchnorm: bool = False) -> nn.Module:
    norm = [nn.BatchNorm1d(hidden)] if batchnorm else []
    return nn.Sequential(nn.Linear(dim, hidden), *norm, nn.Tanh(), nn.Linear(hidden, 1))


class MSEEvaluator(Evaluator):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def update(self, batch: Any) -> None:
        x, y = batch
        prediction = self.model(x).float()
        self.add_sum("squared_error", ((prediction - y) ** 2).sum())
        self.add_rows("prediction", prediction)
        self.count += x.shape[0]

    def compute(self, sums: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, float]:
        n = rows["prediction"].shape[0]
        return {"loss": float(sums["squared_error"]) / n, "n": float(n)}


class RegressionFamily(Family):
    def __init__(self, model: nn.Module):
        self.model = model

    def train_loss(self, batch: Any) -> tuple[Tensor, int]:
        x, y = batch
        return ((self.model(x).float() - y) ** 2).sum(), x.shape[0]

    def evaluator(self, split: str) -> Evaluator:
        return MSEEvaluator(self.raw_model)


def build(cfg: DictConfig, bundle: DataBundle) -> RegressionFamily:
    return RegressionFamily(build_node(cfg.model, "model", dim=bundle.info["dim"]))

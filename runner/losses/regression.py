"""The regression family's objective: the squared error, summed (the engine divides by the count)."""
from __future__ import annotations

from torch import Tensor, nn


class SquaredError(nn.Module):
    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Per-sample squared error [B], summed over the outputs."""
        return ((prediction.float() - target) ** 2).flatten(1).sum(1)

"""The interval loss: a differentiable penalty that keeps outputs inside [low, high].

It is zero while a value lies in the interval and grows quadratically outside it (a squared
hinge), so its gradient is continuous, zero inside and proportional to the distance outside:

    penalty(v) = relu(low - v)**2 + relu(v - high)**2

``interval_penalty`` works on any tensor of outputs. ``IntervalPenalty`` is the module the
multi-label losses add as an optional extra term, configured with the loss key
``interval: {low, high, weight, on}``:

* ``on: logits`` (default) penalises the raw scores, e.g. ``{low: -8, high: 8}`` stops the
  logits running away (over-confidence) while leaving every probability in
  [sigmoid(-8), sigmoid(8)] reachable;
* ``on: probabilities`` penalises ``sigmoid(logits)``, e.g. ``{low: 0.02, high: 0.98}``.

The per-sample term is ``weight`` times the mean of the penalty over the labels, so it adds to
the per-sample loss on the same scale.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from runner.errors import UserError

_ON = ("logits", "probabilities")


def interval_penalty(values: Tensor, low: float, high: float) -> Tensor:
    """Elementwise squared distance of ``values`` to the interval [low, high]."""
    return torch.relu(low - values).square() + torch.relu(values - high).square()


class IntervalPenalty(nn.Module):
    def __init__(self, low: float, high: float, weight: float = 1.0, on: str = "logits") -> None:
        super().__init__()
        if not low < high:
            raise UserError(f"loss.interval needs low < high; got low={low}, high={high}")
        if on not in _ON:
            raise UserError(f"loss.interval.on={on!r} is not known; allowed: {', '.join(_ON)}")
        if weight < 0:
            raise UserError(f"loss.interval.weight={weight} must be >= 0")
        self.low, self.high, self.weight, self.on = float(low), float(high), float(weight), on

    def forward(self, logits: Tensor) -> Tensor:
        """Per-sample penalty [B] from outputs [B, L]."""
        values = torch.sigmoid(logits) if self.on == "probabilities" else logits
        return self.weight * interval_penalty(values, self.low, self.high).mean(1)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}, weight={self.weight}, on={self.on}"


def interval_from_config(node: dict[str, Any] | None) -> IntervalPenalty | None:
    """The ``loss.interval`` key: None (no penalty) or a dict with low, high, weight, on."""
    if node is None:
        return None
    allowed = ("low", "high", "weight", "on")
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        raise UserError(f"unknown key 'loss.interval.{unknown[0]}'; allowed keys: {', '.join(allowed)}")
    missing = [k for k in ("low", "high") if node.get(k) is None]
    if missing:
        raise UserError(f"loss.interval needs {' and '.join(missing)} (the interval ends)")
    for key in ("low", "high", "weight"):
        if key in node and (isinstance(node[key], bool) or not isinstance(node[key], (int, float))):
            raise UserError(f"loss.interval.{key}={node[key]!r} must be a number")
    return IntervalPenalty(**node)

"""``callbacks.anomaly`` (debug=anomaly): find where a NaN or an infinity first appears.

Autograd's anomaly detection is on (a backward op that makes a NaN names its forward op), every
module's output is checked in the forward pass, and every parameter's gradient after each step
(a host read per check: slow, for debugging). The first non-finite value fails the run with one
line naming the module (``decoder.fc2 (Linear)``) or the parameter; exit 1, traceback in run.log.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from runner.callbacks.base import Callback
from runner.errors import NonFiniteLoss


def non_finite(value: Any) -> bool:
    tensors = [value] if isinstance(value, Tensor) else [v for v in (value.values() if isinstance(value, dict)
                                                                      else value if isinstance(value, (tuple, list))
                                                                      else []) if isinstance(v, Tensor)]
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)


class Anomaly(Callback):
    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.anomaly: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        self.anomaly = torch.autograd.set_detect_anomaly(True)
        model = trainer.family.raw_model
        for name, module in model.named_modules():
            self.hooks.append(module.register_forward_hook(self.checker(name or type(model).__name__, module)))

    @staticmethod
    def checker(name: str, module: nn.Module) -> Any:
        def check(_module: nn.Module, inputs: Any, output: Any) -> None:
            if torch.is_grad_enabled() and non_finite(output):  # training's forward pass; not evaluation
                where = "its input" if non_finite(inputs) else "its output (its input is finite)"
                raise NonFiniteLoss(f"non-finite value (NaN or Inf) first in module '{name}' "
                                    f"({type(module).__name__}): {where}")
        return check

    def on_train_steps(self, trainer: Any, steps: int, row: Any) -> None:
        for name, parameter in trainer.family.raw_model.named_parameters():
            if non_finite(parameter.grad) or non_finite(parameter.data):
                raise NonFiniteLoss(f"non-finite value (NaN or Inf) in parameter '{name}' or its gradient after "
                                    f"optimizer step {trainer.state.step}")

    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.close()

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.anomaly is not None:
            torch.autograd.set_detect_anomaly(False)
            self.anomaly = None

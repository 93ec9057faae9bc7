"""Optimizers (group ``optim``): any ``torch.optim`` class by ``_target_``.

``runner/conf/optim/adam.yaml`` and its siblings are presets; ``optim._target_=torch.optim.RAdam`` (or a
user's class) works the same way. The parameters never appear in the config: runner passes them.
One key is runner's own: ``decay_bias_and_norm: false`` puts every bias and normalisation
weight (every parameter of one dimension) in a group without weight decay, the usual rule for
AdamW and SGD training of convolutional nets and transformers.

Under ``trainer.cuda_graph`` the optimizer step is captured with the rest of the step: runner
asks the class for its capturable mode (state and lr on the device), and its fused kernels where
it has them. A class with neither cannot be captured and is refused before the run starts.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from runner.config.build import checked_kwargs
from runner.errors import UserError

OWN_KEYS = ("decay_bias_and_norm",)


def parameter_groups(model: nn.Module, weight_decay: float, decay_bias_and_norm: bool) -> list[dict[str, Any]]:
    """One group of every trainable parameter, or two: weights that decay, and biases and
    normalisation weights (every 1-D parameter) that do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_bias_and_norm or not weight_decay:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def capture_arguments(target: Any, compiled: bool = False) -> dict[str, bool]:
    """The constructor arguments that make ``target``'s step capturable in a CUDA graph (its
    fused kernel where it has one, unless the step is compiled: compile traces the foreach code)."""
    accepted = inspect.signature(target).parameters
    name = getattr(target, "__name__", str(target))
    if "capturable" in accepted:
        return {"capturable": True, **({"fused": True} if name in ("Adam", "AdamW") and not compiled else {})}
    if "fused" in accepted:
        return {"fused": True}
    raise UserError(f"optim {name} cannot be captured in a CUDA graph (it has no capturable or fused mode): "
                    "use it with trainer.cuda_graph=false, or choose Adam, AdamW, SGD, RAdam, NAdam, RMSprop")


def build_optimizer(node: Any, model: nn.Module, device: torch.device | None = None,
                    capturable: bool = False, compiled: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters, from an ``optim`` config node."""
    target, kwargs = checked_kwargs(node, "optim", extra={"params": None}, own_keys=OWN_KEYS)
    kwargs.pop("params")
    own = {k: node.get(k) for k in OWN_KEYS if node.get(k) is not None}
    lr = kwargs.get("lr", inspect.signature(target).parameters["lr"].default
                    if "lr" in inspect.signature(target).parameters else None)
    if isinstance(lr, (int, float)) and lr <= 0:
        raise UserError(f"optim.lr={lr} must be > 0")
    groups = parameter_groups(model, float(kwargs.get("weight_decay", 0.0) or 0.0),
                              bool(own.get("decay_bias_and_norm", True)))
    if capturable:
        # A tensor lr on the device: the schedule fills it in place and the graph reads it.
        kwargs = {**kwargs, **capture_arguments(target, compiled), "lr": torch.tensor(float(lr), device=device)}
    try:
        return target(groups, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"optim {getattr(target, '__name__', target)}: {str(e).splitlines()[0]}") from None


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

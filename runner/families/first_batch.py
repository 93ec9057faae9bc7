"""The check every family runs once, as it is built: the model's output on the first training
samples fits the targets. A user's model (``model._target_=...``) whose output broadcasts
against them trains to the end on a wrong loss: ``[B]`` against ``[B, 1]`` targets is a
``[B, B]`` squared error. Checked here, it stops at start-up (exit 2) with both shapes named.

Each family has ``check_output(batch)`` (one model call on a batch of training samples, a
UserError when the output does not fit) and ends its ``build`` with ``check_first_batch``.
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor

from runner.engine.data import batch_mover, eval_loader
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle, Family
from runner.errors import UserError

SAMPLES = 2  # enough to tell the batch dimension from a dimension of size 1
F = TypeVar("F", bound=Family)


def first_batch(bundle: DataBundle, device: torch.device) -> Any:
    """The first training samples as one batch on ``device`` (the model's while it is built: the
    CPU), made as the engine makes batches: the dataset's own collate and to_device."""
    loader = eval_loader(bundle.train, batch_size=SAMPLES, rank=0, world=1, prebatched=bundle.prebatched)
    return batch_mover(bundle.train, DeviceContext(device, device.type).to_device, device)(next(iter(loader)))


def check_first_batch(family: F, bundle: DataBundle) -> F:
    """``family.check_output`` on the first batch, under no_grad in eval mode (BatchNorm's
    running statistics untouched) with the RNG restored after (the run draws what it drew before)."""
    if bundle.train is None or len(bundle.train) == 0:  # refused by the engine before (an empty split)
        return family
    model = family.raw_model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            family.check_output(first_batch(bundle, device))
    finally:
        model.train(was_training)
    return family


def described(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"{tuple(output.shape)}" + ("" if output.is_floating_point() else f" of {output.dtype}")
    return type(output).__name__


def check_fits(output: Any, expected: tuple[int, ...], what: str, advice: str) -> None:
    """UserError unless ``output`` is a floating-point tensor of exactly the shape ``expected``
    (equal, not broadcastable: broadcasting is what hides the mistake). Shapes only: no sync."""
    if isinstance(output, Tensor) and output.is_floating_point() and tuple(output.shape) == tuple(expected):
        return
    raise UserError(f"the model's output {described(output)} does not fit {what} (expected {tuple(expected)}): "
                    f"{advice}")

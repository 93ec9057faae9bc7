"""The whole optimizer step captured in one CUDA graph, for models too small to keep a GPU busy.

A step of IWAE at batch 20 launches a few hundred tiny kernels; eagerly, the CPU's launch time
is the step time. Captured once, a step is one graph launch. The step is the same arithmetic as
the eager loop (sum of per-unit losses, gradients divided by the unit count, clipping,
optimizer, in runner/engine/step.py): only how it is launched changes. Conditions (``capture_unsupported``): a
CUDA device, one process, ``accumulate_grad_batches=1``, and an optimizer whose state lives on
the device (``capturable``). Batches of another shape (a smaller last batch) run eagerly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def _shape_key(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return (tuple(batch.shape), batch.dtype)
    if isinstance(batch, (list, tuple)):
        return tuple(_shape_key(b) for b in batch)
    return type(batch)


def _copy_into(static: Any, batch: Any) -> None:
    if isinstance(static, Tensor):
        static.copy_(batch, non_blocking=True)
    else:
        for s, b in zip(static, batch):
            _copy_into(s, b)


def step_slice(batch: Any, s: int) -> Any:
    """The s-th batch of a stack of batches (tensor, or tuple of tensors, stacked on dim 0)."""
    if isinstance(batch, Tensor):
        return batch[s]
    return type(batch)(step_slice(b, s) for b in batch)


def _clone(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.clone()
    return type(batch)(_clone(b) for b in batch)


class GraphedStep:
    """``step(batch)`` runs ``body(static_batch)`` — forward, backward and optimizer step — as a
    graph replay once captured. The first ``warmup`` calls run eagerly on a side stream (real
    steps: cuDNN/cuBLAS pick their kernels and the optimizer allocates its state), the next one
    captures and replays."""

    def __init__(self, body: Callable[[Any], None], warmup: int = 3, generators: tuple[torch.Generator, ...] = ()):
        """``generators``: generators other than the default one that ``body`` draws from (a
        fused group's per-job streams); the graph advances them at each replay."""
        self.body, self.warmup, self.generators = body, warmup, generators
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Any = None
        self.key: Any = None

    def accepts(self, batch: Any) -> bool:
        return self.key is None or _shape_key(batch) == self.key

    def __call__(self, batch: Any) -> None:
        if self.graph is not None:
            _copy_into(self.static, batch)
            self.graph.replay()
            return
        if self.static is None:
            self.static, self.key = _clone(batch), _shape_key(batch)
        else:
            _copy_into(self.static, batch)
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body(self.static)
            torch.cuda.current_stream().wait_stream(side)
            return
        self.graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            self.graph.register_generator_state(generator)
        # thread_local: the DataLoader's pin-memory thread may use CUDA while this one captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.body(self.static)
        self.graph.replay()  # capture records without running: this call's step runs now

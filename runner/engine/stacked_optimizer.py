"""One optimizer over a fused group's stacked parameters (runner/engine/fused.py).

On a small model a fused-Adam launch keeps a few of the GPU's SMs busy for a fixed time whatever
its size (IWAE's 0.43 M parameters: 16 thread blocks on an H200's 132 SMs, ~78 µs), and a group
of 8 jobs stepped its 8 optimizers one launch after another: 60% of the group's step. Jobs with the
same optimizer settings share their schedule too (a fused group's settings are equal but for the
free ones), so one optimizer of their class over the stacked tensors takes every job's step in
one launch. Exact for optimizers whose update is elementwise.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from runner.config.build import plain
from runner.config import Config

if TYPE_CHECKING:
    from runner.engine.fused import StackedParameters

# Optimizers whose update is elementwise (each element reads only its own gradient and state, and
# the step count): one of them over the stacked parameters steps every job as its own would.
ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop, torch.optim.NAdam,
               torch.optim.RAdam, torch.optim.Adamax, torch.optim.Adagrad)
SHARED_STATE = ("step", "mu_product")  # per-parameter scalars, equal in every job of a group (lockstep)


class StackedOptimizer:
    """Jobs with the same optimizer settings (fused, they share the schedule too) step as ONE
    optimizer over the stacked parameters: on a small model a fused-Adam launch keeps a few of
    the GPU's SMs busy for a fixed time whatever its size, so one launch for the group instead of
    one per job is most of a fused step's saving. Each job's optimizer state is made of slices of
    the stacked state, so its checkpoint is the one of the job run alone; a resumed group stacks
    its jobs' loaded states. All jobs read one lr tensor, which every job's schedule fills alike."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], models: Sequence[nn.Module],
                 stacks: StackedParameters, compiled: bool):
        self.jobs, lead = list(optimizers), optimizers[0]
        self.stacked = list(stacks.stacked.values())
        self.views = [[model.get_parameter(name) for name in stacks.names] for model in models]
        index = {id(view): i for i, view in enumerate(self.views[0])}
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [self.stacked[index[id(p)]] for p in group["params"]]} for group in lead.param_groups]
        accepted = inspect.signature(type(lead)).parameters
        self.optimizer = type(lead)(groups, **{k: v for k, v in lead.defaults.items() if k in accepted})
        for stacked, grad in zip(self.stacked, stacks.grads):
            stacked.grad = grad  # its slices are the jobs' .grad
        for g, group in enumerate(self.optimizer.param_groups):
            if isinstance(group["lr"], Tensor):  # captured: one device lr for the group
                for optimizer in self.jobs:
                    optimizer.param_groups[g]["lr"] = group["lr"]
        if lead.state:  # a resumed group: its jobs' loaded states, stacked
            for i, stacked in enumerate(self.stacked):
                rows = [optimizer.state[views[i]] for optimizer, views in zip(self.jobs, self.views)]
                self.optimizer.state[stacked] = {key: torch.stack([row[key] for row in rows])
                                                 if self.per_element(key, value) else value
                                                 for key, value in rows[0].items()}
        self.linked = False
        self.link()
        self.take_step = torch.compile(self.optimizer.step) if compiled else self.optimizer.step

    @staticmethod
    def per_element(key: str, value: Any) -> bool:
        return isinstance(value, Tensor) and key not in SHARED_STATE

    def link(self) -> None:
        """Every job's state as its slices of the stacked state, once that exists (optimizers
        make their state at their first step)."""
        if self.linked or not self.optimizer.state:
            return
        for i, stacked in enumerate(self.stacked):
            state = self.optimizer.state[stacked]
            for j, (optimizer, views) in enumerate(zip(self.jobs, self.views)):
                optimizer.state[views[i]] = {key: value[j] if self.per_element(key, value) else value
                                             for key, value in state.items()}
        self.linked = True

    def step(self, source: torch.optim.Optimizer) -> None:
        """One step of every job; ``source``: a live job's optimizer, whose settings (an lr the
        schedule set as a float) the group takes."""
        for group, theirs in zip(self.optimizer.param_groups, source.param_groups):
            group.update((key, value) for key, value in theirs.items() if key != "params")
        self.take_step()
        self.link()


def stackable_optimizers(configs: Sequence[Config], optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Whether the jobs' optimizers can step as one (StackedOptimizer): one elementwise class,
    the same settings."""
    first = plain(configs[0].optim)
    return (all(type(o) is type(optimizers[0]) for o in optimizers) and isinstance(optimizers[0], ELEMENTWISE)
            and all(plain(c.optim) == first for c in configs))

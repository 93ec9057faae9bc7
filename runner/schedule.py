"""Learning-rate schedules (group ``schedule``): any ``torch.optim.lr_scheduler`` class by ``_target_``.

Two keys are runner's own: ``interval`` (``step``: the scheduler steps after every optimizer
step; ``epoch``: after every epoch) and ``warmup_steps`` (a linear warm-up over the first
optimizer steps, multiplying whatever the scheduler says). Where the config leaves them out,
runner fills the run's length into ``total_steps`` (OneCycleLR) and ``T_max``
(CosineAnnealingLR), counted in the schedule's interval. ``ReduceLROnPlateau`` steps after each
validation with the value of ``trainer.monitor``.

The scheduler drives a stand-in optimizer that holds only the hyperparameters, as plain numbers;
after each of its steps runner writes the new lr into the real optimizer, and only when it
changed. Where the real lr is a tensor (an optimizer captured in a CUDA graph) it is filled in
place, so that the captured step reads the new value with no host read-back. What a captured
step cannot follow is a hyperparameter other than the lr (its value is baked into the graph at
capture): OneCycleLR and CyclicLR cycle the momentum unless ``cycle_momentum: false``, and are
refused under ``trainer.cuda_graph=true``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from runner.config.build import checked_kwargs, locate, plain
from runner.errors import UserError

OWN_KEYS = ("interval", "warmup_steps")
INTERVALS = ("step", "epoch")
CYCLED = ("momentum", "betas")  # the hyperparameters besides the lr that torch's schedulers change


def iwae_paper_epochs(last_stage: int, base: int = 3) -> int:
    """Passes in stages 0..last_stage: sum of base^i (3280 for the paper's 0..7 at base 3)."""
    return sum(base**i for i in range(last_stage + 1))


def iwae_paper_stage(epoch: int, base: int = 3) -> int:
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += base**stage
    return stage


class IWAEPaperLR(LambdaLR):
    """Burda, Grosse & Salakhutdinov (2016): stage i = 0..last_stage lasts 3^i passes at
    lr x 10^(-i/7) (3280 passes for the paper's 0..7). Stepped per epoch. ``base: 2`` gives the
    shorter schedule of 2^i passes (255 for 0..7) that practitioners often run instead."""

    def __init__(self, optimizer: torch.optim.Optimizer, last_stage: int = 7, base: int = 3):
        if last_stage < 0:
            raise UserError(f"schedule.last_stage={last_stage} must be >= 0")
        if base < 2:
            raise UserError(f"schedule.base={base} must be >= 2 (stage i lasts base^i passes)")
        self.last_stage = last_stage
        super().__init__(optimizer, lambda epoch: 10 ** (-iwae_paper_stage(epoch, base) / 7))

    @staticmethod
    def run_epochs(last_stage: int = 7, base: int = 3) -> int:
        """The run's length in epochs (trainer.max_epochs=null)."""
        return iwae_paper_epochs(last_stage, base)


def run_epochs(node: Any) -> int | None:
    """The run length a schedule sets on its own (``run_epochs`` of its class), or None."""
    target, kwargs = checked_kwargs(node, "schedule", extra={"optimizer": None}, own_keys=OWN_KEYS)
    length = getattr(target, "run_epochs", None)
    return None if length is None else int(length(**{k: v for k, v in kwargs.items() if k != "optimizer"}))


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value


class Hyperparameters(torch.optim.Optimizer):
    """A stand-in optimizer that a torch scheduler can drive: the real optimizer's param groups
    without their parameters, every value a plain number."""

    def __init__(self, real: torch.optim.Optimizer):
        groups = [{**{k: _number(v) for k, v in g.items() if k != "params"}, "params": [torch.zeros(())]}
                  for g in real.param_groups]
        super().__init__(groups, {k: _number(v) for k, v in real.defaults.items()})

    def step(self, closure: Any = None) -> None:  # nothing to update: it holds no parameters
        return None


class Schedule:
    """The lr of every optimizer step: the scheduler's value times the warm-up factor."""

    def __init__(self, optimizer: torch.optim.Optimizer, node: Any, steps_per_epoch: int, total_steps: int,
                 captured: bool = False):
        own = plain(node)
        self.interval = str(own.get("interval") or "epoch")
        if self.interval not in INTERVALS:
            raise UserError(f"schedule.interval={self.interval!r} is not known; allowed: {', '.join(INTERVALS)}")
        self.warmup_steps = int(own.get("warmup_steps") or 0)
        if self.warmup_steps < 0:
            raise UserError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        self.optimizer, self.captured = optimizer, captured
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.step_count = 0
        self.hyper = Hyperparameters(optimizer)
        length = total_steps if self.interval == "step" else -(-total_steps // self.steps_per_epoch)
        target, kwargs = checked_kwargs(node, "schedule", extra={"optimizer": self.hyper}, own_keys=OWN_KEYS,
                                        fill={"total_steps": length, "T_max": length})
        self.name = getattr(target, "__name__", str(target))
        if captured and kwargs.get("cycle_momentum", self.name in ("OneCycleLR", "CyclicLR")):
            raise UserError(f"schedule {self.name} cycles the momentum, which a captured step reads only once, at "
                            "capture: set schedule.cycle_momentum=false, or trainer.cuda_graph=false")
        try:
            self.scheduler = target(**kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"schedule {self.name}: {str(e).splitlines()[0]}") from None
        self.on_plateau = isinstance(self.scheduler, ReduceLROnPlateau)
        self.written: list[float | None] = [None] * len(optimizer.param_groups)
        self.write()

    # --- when the engine calls it ------------------------------------------------------------
    def step_end(self) -> None:
        """After every optimizer step (also a skipped one: the lr is a function of the step count)."""
        self.step_count += 1
        if self.interval == "step" and not self.on_plateau:
            self.advance()
        elif self.step_count <= self.warmup_steps:
            self.write()

    def epoch_end(self) -> None:
        if self.interval == "epoch" and not self.on_plateau:
            self.advance()

    def validated(self, monitored: float | None) -> None:
        if self.on_plateau and monitored is not None:
            self.hyper.step()
            self.scheduler.step(monitored)
            self.write()

    def constant_for(self, steps: int) -> bool:
        """Whether the next ``steps`` optimizer steps all use the current lr (several captured
        steps in one graph launch share the lr set before the launch). Launches never span an
        epoch's end or a validation, where epoch and plateau schedules change it."""
        if steps <= 1:
            return True
        return self.step_count >= self.warmup_steps and (self.interval == "epoch" or self.on_plateau)

    # --- writing the lr ------------------------------------------------------------------------
    def advance(self) -> None:
        self.hyper.step()  # the scheduler expects an optimizer step before each of its own
        self.scheduler.step()
        self.write()

    def warmup_factor(self) -> float:
        return min(1.0, (self.step_count + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0

    def write(self) -> None:
        factor = self.warmup_factor()
        for i, (group, planned) in enumerate(zip(self.optimizer.param_groups, self.hyper.param_groups)):
            lr = planned["lr"] * factor
            if lr != self.written[i]:  # most schedules change rarely: skip the device write
                self.written[i] = lr
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
            for key in CYCLED:
                if key in planned and planned[key] != _number(group.get(key)):
                    if self.captured:
                        raise UserError(f"schedule {self.name} changed optim.{key}, which a captured step cannot "
                                        "follow: use trainer.cuda_graph=false")
                    group[key] = planned[key]

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.hyper.param_groups]
        return {"scheduler": self.scheduler.state_dict(), "hyper": hyper, "step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for group, saved in zip(self.hyper.param_groups, state["hyper"]):
            group.update({k: tuple(v) if isinstance(v, list) and k == "betas" else v for k, v in saved.items()})
        self.step_count = int(state["step_count"])
        self.written = [None] * len(self.written)
        self.write()

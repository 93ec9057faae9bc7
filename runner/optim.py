"""Optimizers (group ``optim``) and learning-rate schedules (group ``schedule``).

Every schedule is a multiplier of the base lr as a function of the optimizer step, applied by
``Schedule`` after every optimizer step: epoch-based schedules convert the step to an epoch with
the number of optimizer steps per epoch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from runner.config import OptimConfig, ScheduleConfig
from runner.errors import UserError


def build_optimizer(params, cfg: OptimConfig, device: torch.device | None = None,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: state and lr on the device, fused kernels, so that the optimizer step can
    be captured in a CUDA graph (trainer.cuda_graph)."""
    name = cfg.name.value if hasattr(cfg.name, "value") else str(cfg.name)
    if cfg.lr <= 0:
        raise UserError(f"optim.lr={cfg.lr} must be > 0")
    lr: float | torch.Tensor = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    graph_args = {"capturable": True, "fused": True} if capturable else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                **graph_args)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 **graph_args)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **({"fused": True} if capturable else {}))
    raise UserError(f"optim.name={name!r} is not known; allowed: adam, adamw, sgd")


def iwae_paper_epochs(last_stage: int) -> int:
    """Passes in stages 0..last_stage: sum of 3^i (3280 for the paper's 0..7)."""
    return sum(3**i for i in range(last_stage + 1))


def iwae_paper_stage(epoch: int) -> int:
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return stage


def schedule_epochs(cfg: ScheduleConfig) -> int | None:
    """The run length a schedule defines on its own, or None."""
    if _name(cfg) == "iwae_paper":
        if not 0 <= cfg.last_stage:
            raise UserError(f"schedule.last_stage={cfg.last_stage} must be >= 0")
        return iwae_paper_epochs(cfg.last_stage)
    return None


def _name(cfg: ScheduleConfig) -> str:
    return cfg.name.value if hasattr(cfg.name, "value") else str(cfg.name)


def lr_multiplier(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    name = _name(cfg)
    steps_per_epoch = max(1, steps_per_epoch)

    def base(step: int) -> float:
        if name == "constant":
            return 1.0
        if name == "step":
            return cfg.step_gamma ** ((step // steps_per_epoch) // max(1, cfg.step_epochs))
        if name == "cosine":
            progress = min(1.0, step / max(1, total_steps))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if name == "iwae_paper":
            return 10 ** (-iwae_paper_stage(step // steps_per_epoch) / 7)
        raise UserError(f"schedule.name={name!r} is not known; allowed: constant, step, cosine, iwae_paper")

    def multiplier(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        return warm * base(step)

    multiplier(0)  # fail at start-up on an unknown name
    return multiplier


class Schedule:
    """lr = base lr x multiplier(optimizer step), set after every step. A tensor lr (an optimizer
    captured in a CUDA graph) is filled in place from a host float: no device read-back."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]):
        self.optimizer, self.multiplier = optimizer, multiplier
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0
        self.factor: float | None = None
        self._apply()

    def _apply(self) -> None:
        factor = self.multiplier(self.last_step)
        if factor == self.factor:  # most schedules change rarely: skip the device write
            return
        self.factor = factor
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * factor)
            else:
                group["lr"] = base * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def constant_for(self, steps: int) -> bool:
        """Whether the next ``steps`` optimizer steps all use the current lr (several captured
        steps in one graph launch share the lr set before the launch)."""
        now = self.multiplier(self.last_step)
        return all(self.multiplier(self.last_step + j) == now for j in range(1, steps))

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.base_lrs = int(state["last_step"]), [float(b) for b in state["base_lrs"]]
        self.factor = None
        self._apply()


def build_schedule(optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    return Schedule(optimizer, lr_multiplier(cfg, steps_per_epoch, total_steps))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

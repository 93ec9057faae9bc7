"""One optimizer step, taken eagerly or replayed from a CUDA graph: both share ``update``.

The loss of an optimizer step is the sum of per-unit losses over its micro-batches; backward
adds their gradients up, and ``update`` divides them by the number of units in the step (over
all processes), clips, and steps the optimizer. The eager path runs any window of micro-batches
(accumulation, DDP, a smaller last batch, fp16 loss scaling, skipping non-finite steps); the
captured path replays one whole step (forward, backward, ``update``) or several at once from a
CUDA graph (runner/engine/graphs.py), for models too small to keep a GPU busy. Losses stay on
the device in ``running_loss`` and are read only at logging points.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from runner.engine.devices import DeviceContext
from runner.engine.family import Family
from runner.engine.graphs import GraphedStep, step_slice
from runner.engine.windows import Window
from runner.engine.precision import autocast
from runner.errors import NonFiniteLoss


class OptimizerStep:
    def __init__(self, family: Family, optimizer: torch.optim.Optimizer, ctx: DeviceContext, precision: str,
                 clip: float, skip_nonfinite: bool, captured: bool, steps_per_launch: int,
                 compiled_optimizer: bool = False, keep_grad_memory: bool = False):
        self.family, self.optimizer, self.ctx = family, optimizer, ctx
        self.model = family.model  # possibly wrapped (DDP, compile); family.raw_model is the bare one
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.precision, self.clip, self.skip_nonfinite = precision, clip, skip_nonfinite
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "16")
        # trainer.compile_optimizer: the step as generated kernels (precision=16, whose scaler steps
        # the optimizer itself, is refused with it: runner/engine/run.py validate).
        self.compiled_step = torch.compile(optimizer.step) if compiled_optimizer else None
        # With nothing between them (no clipping, no loss scaler), the division by the units and
        # the optimizer step compile as one: the division joins the optimizer's kernels instead
        # of a multi-tensor launch of its own (the same arithmetic, one launch fewer a step).
        self.compiled_update = torch.compile(self.divide_and_step) if compiled_optimizer and clip <= 0 else None
        # Device-side sums since the last log point (the captured step adds into them too).
        self.running_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
        self.running_units = 0
        self.first_bad_step = torch.full((), -1, device=ctx.device, dtype=torch.long)
        self.pending_units = torch.zeros((), device=ctx.device, dtype=torch.float64)  # DDP: counted on the device
        self.graphed = GraphedStep(self.captured_step) if captured else None
        self.steps_per_launch = steps_per_launch
        self.graphed_launch = GraphedStep(self.captured_steps) if steps_per_launch > 1 else None
        self.graph_units = 0
        self.last_skipped = False  # whether the last eager step was skipped as non-finite
        # A fused group's jobs' gradients are views into one stacked tensor: zeroed in place, never
        # set to None. Elsewhere (a captured step too: its backward then writes the gradients into
        # the graph's own memory) they are set to None, so that backward writes them instead of
        # adding them to zeros: a fill and an addition a parameter fewer a step.
        self.keep_grad_memory = keep_grad_memory
        self.zero_grad = True  # a fused group overwrites its gradients at each step instead

    def join_group(self, running_loss: Tensor) -> None:
        """This job's step is taken by a fused group (runner/engine/fused.py): its running loss
        is a slice of the group's, and its gradients are overwritten at each step, not zeroed."""
        self.running_loss, self.zero_grad = running_loss, False

    def update(self, scale: Tensor | float | None, skip: bool = False) -> None:
        """Divide the summed gradients by the step's units (``scale`` = 1 / units; None: divided
        already), clip, step (``skip``: not; a non-finite step skipped, or a fused group that
        steps its jobs' optimizers together)."""
        if not skip and self.compiled_update is not None and isinstance(scale, float):  # (no scaler: see above)
            self.compiled_update(scale)
        else:
            self.divide_clip_step(scale, skip)
        if self.zero_grad:
            self.optimizer.zero_grad(set_to_none=not self.keep_grad_memory)

    def divide(self, scale: Tensor | float) -> None:
        torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], scale)  # one fused launch

    def divide_and_step(self, scale: float) -> None:
        self.divide(scale)
        self.optimizer.step()

    def divide_clip_step(self, scale: Tensor | float | None, skip: bool) -> None:
        self.scaler.unscale_(self.optimizer)
        if scale is not None:
            self.divide(scale)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not skip and self.compiled_step is not None:
            self.compiled_step()
        elif not skip:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # a no-op unless precision=16

    def run(self, window: Window, step_index: int) -> tuple[int, int]:
        """Take the window's optimizer step(s); (steps taken, units trained on by this process)."""
        if window.stacked is not None:
            self.graphed_launch(window.stacked)
            self.running_units += window.steps * self.graph_units
            return window.steps, window.steps * self.graph_units
        if self.graphed is not None:
            batch, weight, last = next(window.micro_batches)
            if self.graphed.accepts(batch):
                self.graphed(batch)  # forward, backward and optimizer step, on the device
                self.running_units += self.graph_units
                return 1, self.graph_units
            window.micro_batches = iter([(batch, weight, last)])  # another shape: this one runs eagerly
        return 1, self.eager(window.micro_batches, step_index)

    def eager(self, micro_batches: Iterator[tuple[Any, int, bool]], step_index: int) -> int:
        ctx = self.ctx
        window_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
        window_units = 0
        for batch, weight, last in micro_batches:
            with ctx.no_sync(self.model, skip=not last), autocast(ctx.device, self.precision):
                loss_sum, units = self.family.train_loss(batch)
                if weight == 0:  # a DDP process whose shard ran out: it joins the all-reduce adding nothing
                    loss_sum, units = loss_sum * 0.0, 0
                self.scaler.scale(loss_sum.float()).backward()
            window_loss += loss_sum.detach().double()
            window_units += int(units)
            # Let this step's autograd graph go now: a CUDA-graph capture later in the run must
            # not find its gradient accumulators alive on another stream.
            del loss_sum
        if ctx.distributed:
            # DDP averaged the gradients over processes: multiply by W/units to get sum/units.
            units = ctx.all_reduce_sum(torch.tensor(float(window_units), device=ctx.device, dtype=torch.float64))
            self.pending_units += units
            scale: Tensor | float = (ctx.world_size / units).float()
        else:
            scale = 1.0 / max(window_units, 1)
        bad = ~torch.isfinite(window_loss)
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step < 0), step_index, self.first_bad_step))
        self.last_skipped = self.skip_nonfinite and bool(bad)  # opt-in: one host sync per step to skip
        self.update(scale, skip=self.last_skipped)
        self.running_loss += window_loss
        self.running_units += window_units
        return window_units

    def captured_step(self, batch: Any) -> None:
        """One whole optimizer step, written to be captured: no host reads, static shapes."""
        with autocast(self.ctx.device, self.precision, cache_enabled=False):
            loss_sum, units = self.family.train_loss(batch)
        loss_sum.float().backward()
        self.graph_units = int(units)
        # The eager step's arithmetic, in its order (sum, backward, divide): the captured step
        # computes the same weights, not merely close ones.
        self.update(1.0 / self.graph_units)
        self.running_loss.add_(loss_sum.detach())  # a NaN or Inf stays in it until check_finite reads it

    def captured_steps(self, batches: Any) -> None:
        """trainer.steps_per_graph optimizer steps, one per stacked batch, captured as one graph."""
        for s in range(self.steps_per_launch):
            self.captured_step(step_slice(batches, s))

    def running_totals(self) -> tuple[Tensor, int]:
        """The loss sum and units since the last logging point, over all processes (a host read;
        every rank calls it): a checkpoint keeps them, so that the first training row after a
        resume averages the same steps as the uninterrupted run's."""
        units = int(self.ctx.all_reduce_sum(torch.tensor(self.running_units, device=self.ctx.device)).item())
        return self.ctx.all_reduce_sum(self.running_loss).detach().double().cpu(), units

    def restore_running(self, loss: Tensor, units: int) -> None:
        """Rank 0 carries the totals on; the other ranks start from zero (the next reading sums them)."""
        main = self.ctx.rank == 0
        self.running_loss.copy_(loss if main else torch.zeros_like(loss))  # in place: a captured step adds into it
        self.running_units = units if main else 0

    def take_running_loss(self) -> float:
        """The mean training loss since the last call, over all processes (a host read)."""
        ctx = self.ctx
        units = int(ctx.all_reduce_sum(torch.tensor(self.running_units, device=ctx.device)).item())
        loss = float(ctx.all_reduce_sum(self.running_loss).item()) / max(1, units)
        self.running_loss.zero_()  # in place: the captured step adds into this tensor
        self.running_units = 0
        return loss

    def check_finite(self, step: int, family_name: str) -> None:
        if self.skip_nonfinite:
            return
        bad = int(self.first_bad_step.item())
        if bad < 0 and not bool(torch.isfinite(self.running_loss)):
            bad = step  # inside a captured step: known to have happened by this step
        if bad >= 0:
            raise NonFiniteLoss(
                f"non-finite training loss (NaN or Inf) in family '{family_name}' at optimizer step {bad}; "
                "lower optim.lr, use trainer.precision=32, or set trainer.skip_nonfinite=true to skip such steps")

    def take_skipped(self) -> int:
        """1 if the last eager step was skipped as non-finite (trainer.skip_nonfinite), else 0."""
        skipped, self.last_skipped = int(self.last_skipped), False
        return skipped

    def take_pending_units(self) -> int:
        """Units counted on the device under DDP since the last call (a host read)."""
        if not self.ctx.distributed:
            return 0
        units = int(self.pending_units.item())
        self.pending_units.zero_()
        return units

"""The one training loop, for every family and every device strategy.

``fit`` reads top to bottom: epochs, then optimizer steps, then each job's logging, validation and
callbacks. A run alone is a group of one; fused jobs (runner/engine/fused.py) move in lockstep.
What a step trains on is runner/engine/windows.py; how a step is taken, eagerly or from a CUDA
graph, runner/engine/step.py. Losses stay on the device and are read only at logging points (no
per-step host sync on the GPU path). Checkpoints, early stopping, the display and plots are
callbacks (runner/callbacks/): the loop calls them, they never reach into it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runner.callbacks.base import Callbacks
from runner.config import TrainerConfig
from runner.engine import checkpoint as ckpt
from runner.engine.clock import Pace, TrainingClock
from runner.engine.devices import DeviceContext
from runner.engine.evaluate import evaluate
from runner.engine.family import DataBundle, Family
from runner.engine.results import RunResults
from runner.engine.signals import SignalFlag
from runner.engine.step import OptimizerStep
from runner.engine.windows import TrainBatches, Window
from runner.errors import Interrupted, UserError
from runner.optim import build_optimizer, has_batchnorm
from runner.schedule import Schedule

log = logging.getLogger("runner")


@dataclass
class LoopState:
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (resume point)
    step: int = 0  # optimizer steps taken
    samples_seen: int = 0  # units (samples or tokens) trained on, all processes
    skipped_steps: int = 0  # non-finite steps skipped (trainer.skip_nonfinite)
    stopped: str | None = None  # why training stopped before its length (a callback's request)


class Trainer:
    """One job's training: what the loop needs between steps. Callbacks get it in every hook."""

    def __init__(self, family: Family, bundle: DataBundle, ctx: DeviceContext, settings: TrainerConfig, optim: Any,
                 schedule: Any, results: RunResults, run_dir: Path | None, callbacks: Callbacks,
                 clock: TrainingClock, meta: dict[str, Any], in_group: bool = False):
        t = self.settings = settings
        self.family, self.bundle, self.ctx, self.results, self.run_dir = family, bundle, ctx, results, run_dir
        self.callbacks, self.clock, self.meta, self.in_group = callbacks, clock, meta, in_group
        self.optimizer = build_optimizer(optim, family.raw_model, ctx.device, capturable=t.cuda_graph,
                                         compiled=t.compile_optimizer)
        self.batches = TrainBatches(bundle, t, ctx)
        self.total_steps = self.batches.steps_per_epoch * int(t.max_epochs)
        if t.max_steps > 0:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.schedule = Schedule(self.optimizer, schedule, self.batches.steps_per_epoch, self.total_steps, t.cuda_graph)
        self.stepper = OptimizerStep(family, self.optimizer, ctx, t.precision, t.gradient_clip_val, t.skip_nonfinite,
                                     t.cuda_graph, t.steps_per_graph, t.compile_optimizer, keep_grad_memory=in_group)
        self.state = LoopState()
        self.final_metrics: dict[str, float] = {}
        self.eval_samples: dict[str, int] = {}
        self.pace = Pace(clock)
        # Plain ints: a config read costs microseconds, a lot next to a captured step.
        self.log_every, self.val_every = int(t.log_every_n_steps), int(t.val_every_n_steps)
        self.open = True  # still training: a job closes when it is done or fails
        self.error: Exception | None = None  # what ended this job early, for its summary
        self.stop_request: str | None = None
        self.final_weights: dict[str, Any] | None = None  # a fused job's weights when it closed

    # --- between steps -------------------------------------------------------------------------
    def count(self, steps: int, units: int) -> None:
        for _ in range(steps):
            self.schedule.step_end()  # also after a skipped step: the lr stays a function of the step count
        self.state.step += steps
        if not self.ctx.distributed:  # under DDP the units are counted on the device (sync_counts)
            self.state.samples_seen += units
        self.state.skipped_steps += self.stepper.take_skipped()

    def after_steps(self, steps: int) -> None:
        row = self.log_training() if self.passed_multiple(self.log_every, steps) or self.done() else None
        if self.passed_multiple(self.val_every, steps):
            self.validate()
        self.callbacks.call("on_train_steps", self, steps, row)
        self.settle_stop(collective=row is not None)
        if self.done():
            self.end_epoch()  # the run's last step: its closing validation, then the end of training

    def end_epoch(self) -> None:
        self.stepper.check_finite(self.state.step, self.bundle.family)
        epoch_done = self.state.batch_in_epoch >= self.batches.per_epoch
        if epoch_done:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.schedule.epoch_end()
        if self.val_every == 0 and self.state.stopped is None:
            self.validate()
        if epoch_done:
            self.callbacks.call("on_epoch_end", self)
        if self.done():  # the last step, or a stop decided by this validation
            self.finish()

    def finish(self) -> None:
        self.open = False
        if self.in_group:  # its slot of the stack goes on being stepped, unused
            self.final_weights = {k: v.clone() for k, v in self.family.raw_model.state_dict().items()}
        self.callbacks.call("on_fit_end", self)

    def validate(self) -> None:
        if self.bundle.val is None:
            return
        with self.clock.paused():
            metrics, self.eval_samples["val"] = evaluate(self.family, self.bundle, "val", self.ctx, self.settings)
            if self.settings.monitor not in metrics:
                produced = ", ".join(sorted(k for k in metrics if k.count("/") == 1))
                raise UserError(f"trainer.monitor={self.settings.monitor} is not a metric of this run's validation; "
                                f"it produces: {produced}")
            self.schedule.validated(metrics[self.settings.monitor])
            self.final_metrics.update(metrics)  # first, so that a checkpoint a callback writes holds them
            self.callbacks.call("on_validation_end", self, metrics)  # they may add metrics of their own
            self.final_metrics.update(metrics)
            self.results.log({"epoch": self.state.epoch, "step": self.state.step, "split": "val", **metrics})
            if self.ctx.is_main:
                self.family.after_evaluation("val", metrics, self.run_dir)
            self.say(f"val @ step {self.state.step}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.count("/") == 1)[:300])
            self.settle_stop(collective=True)

    def log_training(self) -> dict[str, Any]:
        self.stepper.check_finite(self.state.step, self.bundle.family)
        self.sync_counts()
        row = {"epoch": self.state.epoch, "step": self.state.step, "split": "train",
               "loss": self.stepper.take_running_loss(), "lr": self.schedule.lr(),
               f"{self.family.unit}_per_s": self.pace.rate(self.state.samples_seen)}
        self.results.log(row)
        return row

    # --- what callbacks may ask for -----------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """End training after the current window (see runner/callbacks/base.py for DDP)."""
        self.stop_request = self.stop_request or str(reason)

    def settle_stop(self, collective: bool) -> None:
        """A requested stop becomes the run's: at once in one process; under DDP at a point every
        rank reaches at the same step (``collective``), else at the next stop vote (``fit``)."""
        if self.ctx.distributed and not collective:
            return
        asked = self.ctx.any_rank(self.stop_request is not None) if self.ctx.distributed else self.stop_request
        if asked and self.state.stopped is None:
            self.state.stopped = self.stop_request or "a stop requested on another process"

    def save_checkpoint(self, name: str) -> Path | None:
        """Write ``checkpoints/<name>.pt`` (rank 0); every process takes part."""
        with self.clock.paused():
            self.sync_counts()
            return ckpt.save_trainer(self, name)

    def say(self, text: str) -> None:
        log.info(text)
        self.callbacks.call("on_message", self, text)

    # --- small questions -----------------------------------------------------------------------
    def launch_size(self, whole_batches_left: int) -> int:
        """trainer.steps_per_graph where that many steps fit before the end of the epoch and of
        the run and all use one lr (it is set between launches); otherwise 1."""
        n = self.stepper.steps_per_launch
        fits = min(whole_batches_left, self.total_steps - self.state.step) >= n
        return n if fits and self.schedule.constant_for(n) else 1

    def passed_multiple(self, every: int, steps: int) -> bool:
        """Whether the last ``steps`` optimizer steps reached a multiple of ``every`` (0: never)."""
        return every > 0 and self.state.step // every != (self.state.step - steps) // every

    def done(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped is not None

    def sync_counts(self) -> None:
        """Fold the device-side unit count (DDP) into the loop state; called at logging points."""
        self.state.samples_seen += self.stepper.take_pending_units()

    def guarded(self, work: Callable[[], None]) -> None:
        """Run ``work`` for this job; a failure of its own (a non-finite loss, a full disk) ends
        this job alone, and ``error`` keeps it for the job's summary."""
        try:
            work()
        except Interrupted:
            raise
        except Exception as e:
            self.error, self.open = e, False
            self.callbacks.call("on_exception", self, e)


def fit(trainers: list[Trainer], take_steps: Callable[[list[Window | None], int], list[tuple[int, int]]],
        stop: SignalFlag) -> None:
    """The training loop: epochs, optimizer steps, then each job's logging, validation and
    callbacks. ``take_steps`` takes one step for every job (None: a closed job's place); a job
    that is done (its last step, a stop, a failure of its own) closes, the others go on."""
    lead = trainers[0]
    for t in trainers:
        if t.settings.accumulate_grad_batches > 1 and has_batchnorm(t.family.raw_model):
            log.warning("the model has BatchNorm: with accumulate_grad_batches=%d its statistics are computed per "
                        "micro-batch of %d, not per optimizer step", t.settings.accumulate_grad_batches,
                        t.settings.batch_size)
        t.open = t.state.epoch < int(t.settings.max_epochs) and not t.done()  # a resumed run may be done
        t.pace.restart(t.state.samples_seen)
        if t.open:
            t.callbacks.call("on_fit_start", t)
    with lead.clock.running():
        while any(t.open for t in trainers):
            for t in trainers:
                if t.open:
                    t.family.on_train_epoch_start(t.state.epoch)
            epochs = [t.batches.windows(t.state, t.launch_size) for t in trainers]
            while True:
                windows = [next(epoch, None) if t.open else None for epoch, t in zip(epochs, trainers)]
                if all(window is None for window in windows):
                    break  # the epoch's batches are done, or every job is
                taken = take_steps(windows, lead.state.step)
                for t, window, (steps, units) in zip(trainers, windows, taken):
                    if window is not None:
                        t.count(steps, units)
                        t.guarded(lambda: t.after_steps(steps))
                signum, asked = stop.agreed(requested=lead.stop_request is not None)
                if asked and lead.open:  # DDP: a stop a callback asked for between collective points
                    lead.state.stopped = lead.state.stopped or lead.stop_request or "a stop requested on another process"
                    lead.guarded(lead.end_epoch)
                if signum is not None:  # the step is done: each open job's callbacks write its checkpoint
                    interrupt(trainers, signum)
            for t in trainers:
                if t.open:
                    t.guarded(t.end_epoch)
            signum, _ = stop.agreed(now=True)
            if signum is not None:
                interrupt(trainers, signum)


def interrupt(trainers: list[Trainer], signum: int) -> None:
    for t in trainers:
        if t.open:
            t.callbacks.call("on_interrupt", t, signum)
    raise Interrupted(signum)

"""The one training loop, for every family and every device strategy.

``fit`` reads top to bottom: epochs, then optimizer steps, then logging, validation and
checkpoints. A step's work is a ``Window``: the micro-batches of one optimizer step (exact
accumulation: the step's gradient is the sum of per-unit losses over its micro-batches divided by
the units in them, also for a shorter last window and a smaller last batch), or the stacked
batches of several captured steps launched at once (trainer.steps_per_graph). How a step is
taken, eagerly or from a CUDA graph, is runner/engine/step.py. Losses stay on the device and are
read only at logging points (no per-step host sync on the GPU path).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from runner.config import MonitorMode, TrainerConfig
from runner.engine import checkpoint as ckpt
from runner.engine import data as loaders
from runner.engine.devices import DeviceContext
from runner.engine.evaluate import evaluate
from runner.engine.family import DataBundle, Family
from runner.engine.progress import ProgressDisplay
from runner.engine.results import RunResults
from runner.engine.signals import SignalFlag
from runner.engine.step import OptimizerStep, Window
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
    best: float | None = None  # best value of trainer.monitor so far
    stale_validations: int = 0  # validations since trainer.monitor last improved by min_delta
    stopped_early: bool = False
    top: list = field(default_factory=list)  # [value, step] of the checkpoints kept (save_top_k > 1), best first


class TrainingClock:
    """Wall time spent training: evaluation and checkpoint time are left out."""

    def __init__(self) -> None:
        self.train_s = self.paused_s = 0.0
        self._depth = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._depth += 1
        started = time.time()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:  # a checkpoint written inside a validation counts once
                self.paused_s += time.time() - started

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        started, paused = time.time(), self.paused_s
        try:
            yield
        finally:
            self.train_s += time.time() - started - (self.paused_s - paused)


class Trainer:
    """What the loop needs between steps; ``fit`` is the loop."""

    def __init__(self, family: Family, bundle: DataBundle, ctx: DeviceContext, trainer: TrainerConfig,
                 optim: Any, schedule: Any, results: RunResults, run_dir: Path | None, meta: dict[str, Any]):
        t = self.t = trainer
        self.family, self.bundle, self.ctx, self.results, self.run_dir = family, bundle, ctx, results, run_dir
        self.meta = meta  # stored in every checkpoint: the resolved config and the model's target
        captured = t.cuda_graph
        self.optimizer = build_optimizer(optim, family.raw_model, ctx.device, capturable=captured,
                                         compiled=t.compile_optimizer)
        self.device_batches = loaders.resident(bundle.train, ctx.device) if t.data_on_device else None
        # Resident batches are cut on the device already: nothing to move on the per-step path.
        self.move_batch = ((lambda batch: batch) if self.device_batches is not None
                           else loaders.batch_mover(bundle.train, ctx.to_device, ctx.device))
        self.batches_per_epoch = loaders.train_batches_per_epoch(bundle.train, t.batch_size, ctx.world_size,
                                                                 bundle.prebatched)
        if t.limit_train_batches > 0:
            self.batches_per_epoch = min(self.batches_per_epoch, t.limit_train_batches)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.accumulate_grad_batches)
        self.total_steps = self.steps_per_epoch * int(t.max_epochs)
        if t.max_steps > 0:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.schedule = Schedule(self.optimizer, schedule, self.steps_per_epoch, self.total_steps, captured)
        self.stepper = OptimizerStep(family, self.optimizer, ctx, t.precision, t.gradient_clip_val,
                                     t.skip_nonfinite, captured, t.steps_per_graph, t.compile_optimizer)
        self.state = LoopState()
        self.monitor_sign = 1.0 if t.monitor_mode == MonitorMode.min else -1.0
        self.final_metrics: dict[str, float] = {}
        self.eval_samples: dict[str, int] = {}
        self.clock = TrainingClock()
        self.progress = ProgressDisplay(self.total_steps, family.unit, t.progress, enabled=ctx.is_main)
        # Plain ints: a config read costs microseconds, a lot next to a captured step.
        self.log_every, self.val_every = int(t.log_every_n_steps), int(t.val_every_n_steps)
        self.ckpt_every, self.accumulate = int(t.ckpt_every_n_steps), int(t.accumulate_grad_batches)
        self.ckpt_every_epochs = int(t.ckpt_every_n_epochs)
        self.last_log = (time.time(), 0, 0.0)  # wall time, units seen, paused time
        self.open = True  # still training: a job closes when it is done or fails
        self.error: Exception | None = None  # what ended this job early, for its summary
        self.closed_weights: str | None = None  # a fused job: the checkpoint of its weights when it closed

    # --- the loop -----------------------------------------------------------------------------
    def fit(self, stop: SignalFlag) -> None:
        """Train this run alone: the loop below with a group of one."""
        fit([self], lambda windows, step: [self.stepper.run(windows[0], step)], stop)

    def windows(self) -> Iterator[Window]:
        """This epoch's optimizer steps from the resume point: windows of accumulate_grad_batches
        micro-batches (the last one may be shorter), or runs of captured steps."""
        batches = iter(self.epoch_batches(self.state.epoch))
        previous: list[Any] = [None]
        while self.state.batch_in_epoch < self.batches_per_epoch:
            start = self.state.batch_in_epoch
            n = self.steps_in_one_launch(batches)
            if n > 1:
                self.state.batch_in_epoch += n
                yield Window(stacked=batches.take(n), steps=n)
                continue
            end = min((start // self.accumulate + 1) * self.accumulate, self.batches_per_epoch)
            yield Window(micro_batches=self.micro_batches(batches, end - start, previous))

    def micro_batches(self, batches: Iterator[Any], count: int, previous: list[Any]) -> Iterator[tuple[Any, int, bool]]:
        for j in range(count):
            batch = next(batches, None)
            # Shards differ by at most one sample, so a process may run out one batch early: it
            # repeats its last batch with weight 0, taking part in DDP's gradient all-reduce
            # without adding anything to it.
            weight = 0 if batch is None else 1
            batch = previous[0] if batch is None else self.move_batch(batch)
            previous[0] = batch
            self.state.batch_in_epoch += 1
            yield batch, weight, j == count - 1

    def count(self, steps: int, units: int) -> None:
        for _ in range(steps):
            self.schedule.step_end()  # also after a skipped step: the lr stays a function of the step count
        self.state.step += steps
        self.progress.advance(self.state.step, self.state.epoch)  # host-side only: no device read
        if not self.ctx.distributed:  # under DDP the units are counted on the device (sync_counts)
            self.state.samples_seen += units
        if self.stepper.last_skipped:
            self.state.skipped_steps += 1
            self.stepper.last_skipped = False

    def after_steps(self, steps: int) -> None:
        if self.passed_multiple(self.log_every, steps) or self.done():
            self.log_training()
        if self.passed_multiple(self.val_every, steps):
            self.validate()
        if self.passed_multiple(self.ckpt_every, steps):
            self.save("last")
        if self.done():
            self.end_epoch()  # the run's last step: its closing validation and checkpoint

    def end_epoch(self) -> None:
        self.stepper.check_finite(self.state.step, self.bundle.family)
        if self.state.batch_in_epoch >= self.batches_per_epoch:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
            self.schedule.epoch_end()
        if self.val_every == 0 and not self.state.stopped_early:
            self.validate()
        if self.state.epoch % self.ckpt_every_epochs == 0 or self.done():
            self.save("last")
        if self.done():  # the last step, or early stopping decided by this validation
            self.open = False

    def guarded(self, work: Callable[[], None]) -> None:
        """Run ``work`` for this job; a failure of its own (a non-finite loss, a full disk) ends
        this job alone, and ``error`` keeps it for the job's summary."""
        try:
            work()
        except Interrupted:
            raise
        except Exception as e:
            self.error, self.open = e, False

    # --- what the loop does between steps --------------------------------------------------------
    def epoch_batches(self, epoch: int) -> Any:
        t, ctx = self.t, self.ctx
        common = dict(batch_size=t.batch_size, epoch=epoch, seed=t.seed, rank=ctx.rank, world=ctx.world_size,
                      weights=self.bundle.train_weights, skip_batches=self.state.batch_in_epoch)
        if self.device_batches is not None:
            return self.device_batches.epoch(**common)
        return loaders.train_loader(self.bundle.train, prebatched=self.bundle.prebatched, num_workers=t.num_workers,
                                    pin=ctx.device.type == "cuda", **common)

    def steps_in_one_launch(self, batches: Any) -> int:
        """trainer.steps_per_graph where that many steps fit before the end of the epoch and of
        the run and all use one lr (it is set between launches); otherwise 1."""
        n = self.stepper.steps_per_launch  # > 1 only with data_on_device (validated): batches is a ResidentEpoch
        if n == 1:
            return 1
        left = min(batches.full_batches_left(), self.batches_per_epoch - self.state.batch_in_epoch,
                   self.total_steps - self.state.step)
        return n if left >= n and self.schedule.constant_for(n) else 1

    def passed_multiple(self, every: int, steps: int) -> bool:
        """Whether the last ``steps`` optimizer steps reached a multiple of ``every`` (0: never)."""
        return every > 0 and self.state.step // every != (self.state.step - steps) // every

    def done(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early

    def stop_reason(self) -> str:
        if self.state.stopped_early:
            return "early_stopping"
        return "max_steps" if 0 < self.t.max_steps <= self.state.step else "max_epochs"

    def log_training(self) -> None:
        self.stepper.check_finite(self.state.step, self.bundle.family)
        self.sync_counts()
        loss = self.stepper.take_running_loss()
        now, (then, units_then, paused_then) = time.time(), self.last_log
        busy = now - then - (self.clock.paused_s - paused_then)  # training time only
        rate = (self.state.samples_seen - units_then) / max(busy, 1e-9)
        self.last_log = (now, self.state.samples_seen, self.clock.paused_s)
        self.progress.update(self.state.step, self.state.epoch, loss, rate)
        self.results.log({"epoch": self.state.epoch, "step": self.state.step, "split": "train", "loss": loss,
                          "lr": self.schedule.lr(), f"{self.family.unit}_per_s": rate})

    def validate(self) -> None:
        if self.bundle.val is None:
            return
        with self.clock.paused():
            metrics, count = evaluate(self.family, self.bundle, "val", self.ctx, self.t)
            self.eval_samples["val"] = count
            self.final_metrics.update(metrics)
            self.results.log({"epoch": self.state.epoch, "step": self.state.step, "split": "val", **metrics})
            if self.ctx.is_main:
                self.family.after_evaluation("val", metrics, self.run_dir)
            self.progress.message(f"val @ step {self.state.step}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.count("/") == 1)[:300])
            if self.t.monitor not in metrics:
                produced = ", ".join(sorted(k for k in metrics if k.count("/") == 1))
                raise UserError(f"trainer.monitor={self.t.monitor} is not a metric of this run's validation; "
                                f"it produces: {produced}")
            monitored = metrics[self.t.monitor]
            self.schedule.validated(monitored)
            self.judge(monitored)

    def judge(self, monitored: float) -> None:
        """Keep the best checkpoints by trainer.monitor, and stop early when it has not improved
        by min_delta for ``patience`` validations. Every process sees the same reduced metrics,
        so under DDP every rank stops at the same step."""
        if not math.isfinite(monitored):
            return
        sign, best, stopping = self.monitor_sign, self.state.best, self.t.early_stopping
        if best is None or sign * monitored < sign * best - stopping.min_delta:
            self.state.stale_validations = 0
        else:
            self.state.stale_validations += 1
        if best is None or sign * monitored < sign * best:
            self.state.best = monitored
            if self.t.save_top_k == 1:
                self.save("best")
        if self.t.save_top_k > 1:
            self.keep_if_top(monitored)
        if 0 < stopping.patience <= self.state.stale_validations:
            self.state.stopped_early = True
            self.progress.message(f"early stopping at step {self.state.step}: {self.t.monitor} has not improved by "
                                  f"{stopping.min_delta} for {stopping.patience} validations")

    def keep_if_top(self, value: float) -> None:
        """save_top_k > 1: checkpoints/best_step<N>.pt for the k best validations; best.pt is a
        second name (a hard link: no more disk) of the best of them."""
        top, k, sign = self.state.top, self.t.save_top_k, self.monitor_sign
        if len(top) >= k and sign * value >= sign * top[-1][0]:
            return
        self.save(f"best_step{self.state.step}")
        top.append([value, self.state.step])
        top.sort(key=lambda entry: (sign * entry[0], entry[1]))
        folder = self.run_dir / "checkpoints" if self.run_dir is not None and self.ctx.is_main else None
        for _, step in top[k:]:
            if folder is not None:
                (folder / f"best_step{step}.pt").unlink(missing_ok=True)
        del top[k:]
        if folder is not None and top[0][1] == self.state.step:
            link = folder / ".best.pt.link"
            link.unlink(missing_ok=True)
            os.link(folder / f"best_step{self.state.step}.pt", link)
            os.replace(link, folder / "best.pt")

    def warn_if_batchnorm_accumulates(self) -> None:
        if self.accumulate > 1 and has_batchnorm(self.family.raw_model):
            log.warning("the model has BatchNorm: with accumulate_grad_batches=%d its statistics are computed per "
                        "micro-batch of %d, not per optimizer step", self.accumulate, self.t.batch_size)

    def sync_counts(self) -> None:
        """Fold the device-side unit count (DDP) into the loop state; called at logging points."""
        self.state.samples_seen += self.stepper.take_pending_units()

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "model": ckpt.own_storage(self.family.raw_model.state_dict()),
            "optimizer": ckpt.own_optimizer_storage(self.optimizer.state_dict()),
            "schedule": self.schedule.state_dict(),
            "scaler": self.stepper.scaler.state_dict(),
            "loop": asdict(self.state),
            "rng": self.rng_state(),
            "family": self.family.state_dict() if hasattr(self.family, "state_dict") else {},
            # The last validation's metrics: a run resumed after it still reports them.
            "metrics": dict(self.final_metrics),
            "eval_samples": dict(self.eval_samples),
            **self.meta,
        }

    def rng_state(self) -> dict[str, Any]:
        """Every RNG state the next step depends on. A fused job (runner/engine/fused.py) draws
        from its own generator: its state takes the place of the device's global one, so that
        the checkpoint is the one of the same job run alone."""
        generator = self.family.generator
        if generator is None:
            return ckpt.rng_state()
        state = dict(self.family.rng_at_build)
        if generator.device.type == "cuda":
            index = generator.device.index or 0
            state["cuda"] = [generator.get_state() if i == index else s for i, s in enumerate(state["cuda"])]
        else:
            state["torch"] = generator.get_state()
        return state

    def restore_rng(self, state: dict[str, Any]) -> None:
        generator = self.family.generator
        if generator is None:
            ckpt.set_rng_state(state)
            return
        self.family.rng_at_build = state
        generator.set_state(state["cuda"][generator.device.index or 0] if generator.device.type == "cuda"
                            else state["torch"])

    def save(self, name: str) -> None:
        with self.clock.paused():
            self.sync_counts()
            if self.ctx.is_main and self.run_dir is not None:
                ckpt.save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt", self.checkpoint_payload())
            self.ctx.barrier()

    def restore(self, payload: dict[str, Any], path: Path) -> None:
        ckpt.load_model_weights(self.family.raw_model, payload, path)
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:  # a captured step reads its lr tensor on the device
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].to(self.ctx.device)
        self.schedule.load_state_dict(payload["schedule"])
        self.stepper.scaler.load_state_dict(payload["scaler"])
        self.state = LoopState(**payload["loop"])
        self.final_metrics = dict(payload.get("metrics", {}))
        self.eval_samples = dict(payload.get("eval_samples", {}))
        self.restore_rng(payload["rng"])
        if payload.get("family") and hasattr(self.family, "load_state_dict"):
            self.family.load_state_dict(payload["family"])


def fit(trainers: list[Trainer], take_steps: Callable[[list[Window | None], int], list[tuple[int, int]]],
        stop: SignalFlag) -> None:
    """The training loop: epochs, optimizer steps, then each job's logging, validation and
    checkpoints. A run alone is a group of one. Fused jobs (runner/engine/fused.py) move in
    lockstep, ``take_steps`` taking one step for all of them (None: a closed job's place); a job
    that is done (its last step, early stopping, a failure of its own) closes, the others go on."""
    lead = trainers[0]
    for t in trainers:
        t.warn_if_batchnorm_accumulates()
        t.open = t.open and t.state.epoch < int(t.t.max_epochs) and not t.done()  # a resumed run may be done
        t.last_log = (time.time(), t.state.samples_seen, t.clock.paused_s)
    with lead.clock.running(), lead.progress:
        while any(t.open for t in trainers):
            for t in trainers:
                if t.open:
                    t.family.on_train_epoch_start(t.state.epoch)
            epochs = [t.windows() for t in trainers]
            while True:
                windows = [next(epoch, None) if t.open else None for epoch, t in zip(epochs, trainers)]
                if all(window is None for window in windows):
                    break  # the epoch's batches are done, or every job is
                taken = take_steps(windows, lead.state.step)
                for t, window, (steps, units) in zip(trainers, windows, taken):
                    if window is not None:
                        t.count(steps, units)
                        t.guarded(lambda: t.after_steps(steps))
                signum = stop.agreed()
                if signum is not None:  # the step is done: write each open job's checkpoint and stop
                    for t in trainers:
                        if t.open:
                            t.save("last")
                    raise Interrupted(signum)
            for t in trainers:
                if t.open:
                    t.guarded(t.end_epoch)
            signum = stop.agreed(now=True)
            if signum is not None:
                raise Interrupted(signum)  # each open job has just written its checkpoint

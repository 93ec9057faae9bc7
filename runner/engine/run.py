"""A run's life, written once: typed settings in, summary.json and an exit code out.

``run_jobs`` takes jobs from their checks to their summaries: each is checked and built
(``RunLife.prepare``; mode=eval and predict finish there), trained (a run alone is a group of
one; ``hydra/launcher=fused`` gives a group of several, runner/engine/fused.py), tested, and
closed. Every way a run ends is written to summary.json: completed, failed (with the error) or
interrupted; the exit code is 0, 1, 2, 130 or 143 (runner/errors.py). A signal at any moment,
start-up included, is recorded as an interruption.
"""
from __future__ import annotations

import logging
import os
import signal
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from runner.callbacks.base import Callbacks
from runner.config import Config, Mode, rules
from runner.engine import devices
from runner.engine.clock import TrainingClock
from runner.engine.evaluate import evaluate_checkpoint, test_trained
from runner.engine.family import DataBundle, Family
from runner.engine.loop import Trainer, fit
from runner.engine.precision import set_matmul_precision
from runner.engine.predict import predict
from runner.engine.progress import metrics_table, predictions_line
from runner.engine.results import RunResults
from runner.engine.setup import build_callbacks, build_data, build_family, load_trained, make_trainer, seed_everything
from runner.engine.signals import SignalFlag
from runner.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_USER_ERROR, Interrupted, NonFiniteLoss, UserError
from runner.loggers import JobInfo, RunInfo
from runner.runs.identity import record_identity  # [cluster] git commit, versions, GPU, parameter count

log = logging.getLogger("runner")


class RunLife:
    """One run's folder, results and status from its settings to its exit code."""

    def __init__(self, config: Config, run_dir: Path | None, choices: dict[str, str] | None = None,
                 job: JobInfo | None = None):
        self.config, self.run_dir, self.choices = config, run_dir, choices or {}
        quiet = int(os.environ.get("RANK", "0")) != 0  # rank 0 speaks for all
        self.console = Console(quiet=quiet)
        self.errors = Console(stderr=True, quiet=quiet)  # how a run failed goes to stderr, as Hydra's errors do
        self.results = RunResults(run_dir, run=RunInfo.of(config, run_dir, choices, job), logger=config.logger)
        if config.debug:  # a debug run (the debug group) says so wherever its results are read
            self.results.summary["debug"] = config.debug
        self.ctx: devices.DeviceContext | None = None
        self.bundle: DataBundle | None = None
        self.callbacks = Callbacks({})
        self.trainer: Trainer | None = None
        self.status, self.code = "running", EXIT_OK
        self.outcome = ""  # the one line that says how the run ended (close prints it)

    def prepare(self, bundle: DataBundle | None = None) -> Family | None:
        """Checks, device, callbacks, seed, data and family (``bundle``: data already built, which
        a fused group shares); mode=eval and predict run here and return None."""
        config, results = self.config, self.results
        rules.check(config, self.choices)
        ctx = self.ctx = devices.resolve(config.device.strategy, config.device.index, config.device.backend)
        rules.check_device(config, ctx.device.type, ctx.world_size)
        self.callbacks = build_callbacks(config.callbacks) if config.mode == Mode.train else Callbacks({})
        results.summary["device"] = ctx.describe()
        if not ctx.is_main:
            results = self.results = RunResults(None)
        if config.resume:
            results.hold()
        results.write_summary(status="running")
        log.info("run folder %s, device %s\n%s", self.run_dir, results.summary["device"],
                 OmegaConf.to_yaml(OmegaConf.structured(config)))
        seed_everything(config.trainer.seed, config.trainer.deterministic)
        set_matmul_precision(config.trainer.precision)
        self.bundle = bundle or build_data(config, ctx, self.choices)
        family = build_family(config, ctx, self.bundle)
        record_identity(results, family.raw_model, ctx.device, config.tags)  # [cluster] what ran: summary.json + trackers
        if config.mode == Mode.train:
            return family
        load_trained(config, family, ctx)
        self.announce()
        if config.mode == Mode.eval:
            evaluate_checkpoint(family, self.bundle, ctx, config.trainer, results, self.run_dir)
        else:
            results.summary["predictions"] = predict(family, self.bundle, ctx, config.trainer, self.run_dir)
        self.status = "completed"
        return None

    def make_trainer(self, family: Family, clock: TrainingClock, in_group: bool = False) -> Trainer:
        self.trainer = make_trainer(self.config, family, self.bundle, self.ctx, self.results, self.run_dir,
                                    self.callbacks, clock, in_group)
        self.announce()
        return self.trainer

    def announce(self) -> None:
        """The run folder and device, once everything that can refuse the settings has been built
        (data, model, optimizer, checkpoint): a run rejected before then prints no folder, since
        a single one leaves none behind (runner/job.py)."""
        if self.ctx is not None and self.ctx.is_main and self.run_dir is not None:
            self.console.print(f"run folder: {self.run_dir}\ndevice: {self.results.summary['device']}",
                               highlight=False, markup=False, soft_wrap=True)

    def test(self) -> None:
        test_trained(self.trainer, self.results)
        self.status = "completed"

    def fail(self, e: BaseException) -> None:
        """Record what ended the run (the first thing that did): a user error (exit 2), an
        interrupt (130 / 143), or a run-time failure (exit 1; the traceback goes to run.log).
        ``close`` says it on the terminal, in one line."""
        if self.trainer is not None and e is not self.trainer.error and not isinstance(e, Interrupted):
            self.trainer.callbacks.call("on_exception", self.trainer, e)  # the loop's own failures: once
        if self.status != "running":
            log.info("after the run ended (%s): %s: %s", self.status, type(e).__name__, e)
            return
        if isinstance(e, UserError):
            self.status, self.code, message = "failed", EXIT_USER_ERROR, str(e)
            log.info("user error: %s", e)  # run.log only; the terminal gets the one line of close()
            self.outcome = f"[bold red]error:[/] {escape(str(e))}"
        elif isinstance(e, Interrupted):
            self.status, self.code, message = "interrupted", e.exit_code, str(e)
            done = {None: "checkpoint written to checkpoints/last.pt", "start-up": "nothing was trained"}.get(
                e.during, "training's last checkpoint kept")
            self.outcome = f"[yellow]{e}: {done}; continue with resume={self.run_dir}"
        elif isinstance(e, KeyboardInterrupt):
            self.status, self.code = "interrupted", EXIT_SIGINT
            message = "interrupted by a second SIGINT (no checkpoint of the current step)"
            self.outcome = f"[yellow]{message}"
        else:
            self.status, self.code, message = "failed", EXIT_FAILED, runtime_message(e)
            log.info("run failed: %s\n%s", message, "".join(traceback.format_exception(e)))  # run.log only
            where = f" (traceback in {self.run_dir / 'run.log'})" if self.run_dir is not None else ""
            self.outcome = f"[bold red]failed:[/] {escape(message)}{where}"
        self.results.summary["error"] = message

    def close(self) -> int:
        """Write the summary (any status), let the callbacks and loggers finish, say the outcome
        in one line; the exit code."""
        trainer, results, status, ctx = self.trainer, self.results, self.status, self.ctx
        if trainer is not None:
            # Folding in the other processes' counts is a collective: skip it when a process
            # failed, since the others may never reach it.
            if not (status == "failed" and ctx is not None and ctx.distributed):
                trainer.sync_counts()
            s, seconds = trainer.state, trainer.clock.train_s
            results.summary["stop_reason"] = stop_reason(trainer) if status == "completed" else status
            results.summary.update(steps=s.step, samples_seen=s.samples_seen, epochs=s.epoch,
                                   skipped_steps=s.skipped_steps, unit=trainer.family.unit,
                                   throughput=round(s.samples_seen / seconds, 3) if seconds else None)
        try:
            results.write_summary(status=status)
        except OSError as e:  # the disk is full or the folder read-only: even in place, no summary
            if self.status == "completed":
                self.status, self.code = "failed", EXIT_FAILED
                self.outcome = "[bold red]failed:[/] cannot write the run's results"
            self.outcome += f"; summary.json could not be written: {os_message(e)}"
        try:  # the summary is written: what fails now is said, and changes nothing of the outcome
            if trainer is not None:
                trainer.callbacks.call("on_run_end", trainer, self.status)
            results.finish()
        except Exception as e:
            log.warning("after the summary was written: %s", runtime_message(e))
        if self.outcome:  # a failure on stderr; an interruption (resume= continues it) on stdout
            (self.errors if self.status == "failed" else self.console).print(self.outcome, highlight=False,
                                                                             soft_wrap=True)
            log.info("%s", Text.from_markup(self.outcome).plain)
        elif self.status == "completed" and results.enabled:
            predictions = results.summary.get("predictions")
            if predictions is None:
                log.info("%s: final metrics\n%s", results.title, "\n".join(
                    f"{k} {v}" for k, v in sorted(results.summary["metrics"].items()) if k.count("/") <= 1))
                self.console.print(f"[bold]{results.title}: final metrics", soft_wrap=True)
                self.console.print(metrics_table(results.summary["metrics"]))
            self.console.print(f"run folder: {self.run_dir}", soft_wrap=True)
            if predictions is not None:  # a predict run ends with the file, its rows and their score
                log.info("%s", predictions_line(predictions))
                self.console.print(predictions_line(predictions), highlight=False, soft_wrap=True)
        return self.code


class Alone:
    """How a run alone trains: its own data and generator, its own optimizer step."""

    shares_data = in_group = False

    def built(self, life: RunLife, family: Family) -> None:
        pass

    def bind(self, families: list[Family | None]) -> None:
        pass

    def take_steps(self, lives: list[RunLife], trainers: list[Trainer | None]) -> Any:
        stepper = trainers[0].stepper
        return lambda windows, step: [stepper.run(windows[0], step)]


# What ends a job's run and is recorded in its summary: a failure, a second Ctrl-C, a signal.
RUN_ENDING = (Exception, KeyboardInterrupt, Interrupted)


def run_jobs(jobs: Sequence[tuple[Config, Path | None, dict[str, str] | None, JobInfo | None]],
             group: Any = None, outcome: dict | None = None) -> list[int]:
    """Run the jobs (config, run folder, choices, JobInfo) as one group; their exit codes.
    ``group``: how they train together (``Alone()`` for one job, runner/engine/fused.py's
    ``FusedGroup`` for several); a job that fails to start fails alone."""
    group = group or Alone()
    lives = [RunLife(*job) for job in jobs]
    with SignalFlag() as stop:
        families: list[Family | None] = []
        bundle = None  # a fused group's jobs share the data
        for life in lives:  # each job built as it would be alone: seeded, then its model drawn
            family = None
            try:
                with stop.immediate("start-up"):
                    family = life.prepare(bundle)
                    if family is not None:
                        group.built(life, family)
            except RUN_ENDING as e:
                life.fail(e)
            bundle = (life.bundle or bundle) if group.shares_data else None
            families.append(family)
        group.bind(families)
        clock = TrainingClock()
        trainers: list[Trainer | None] = []
        for life, family in zip(lives, families):
            trainer = None
            if family is not None:
                try:
                    with stop.immediate("start-up"):
                        trainer = life.make_trainer(family, clock, in_group=group.in_group)
                except RUN_ENDING as e:
                    life.fail(e)
            trainers.append(trainer)
        train([life for life, t in zip(lives, trainers) if t is not None], group.take_steps(lives, trainers)
              if any(trainers) else None, stop)
        for life in lives:  # a signal during one job's evaluation or close: no later evaluation starts
            if life.trainer is not None and life.status == "running":
                try:
                    with stop.immediate("the test evaluation"):
                        life.test()
                except RUN_ENDING as e:
                    life.fail(e)
        codes = [life.close() for life in lives]
    if outcome is not None:
        outcome.update(lives[0].results.summary)
    devices.shutdown()  # also for a one-process ddp group
    return codes


def train(lives: list[RunLife], take_steps: Any, stop: SignalFlag) -> None:
    """Fit the trainers of ``lives`` together; a failure of the step itself fails every one."""
    if not lives:
        return
    trainers = [life.trainer for life in lives]
    lead = trainers[0]
    shared = lead.callbacks
    for t in trainers[1:]:  # one display for the group
        t.callbacks = t.callbacks.sharing(shared)
    stop.join(distributed=lead.ctx.distributed)
    try:
        fit(trainers, take_steps, stop)
    except RUN_ENDING as e:
        if stop.signum is not None and not isinstance(e, (Interrupted, KeyboardInterrupt)):
            # A signal to the whole process group (Ctrl-C, timeout, SLURM) also reaches torch.compile's
            # worker processes: the step that then fails was stopped by the signal, not by a fault.
            log.info("the step failed after %s: %s: %s", signal.Signals(stop.signum).name, type(e).__name__, e)
            e = Interrupted(stop.signum, "a step (the signal stopped it)")
        for life in lives:
            if life.status == "running":
                life.fail(e)


def run(config: Config, run_dir: Path | None, choices: dict[str, str] | None = None,
        job: JobInfo | None = None, outcome: dict | None = None) -> int:
    """Run one job; returns the exit code. ``run_dir`` is None on processes other than rank 0;
    ``choices`` names the option chosen in each group (for messages); ``job``: the job's
    overrides and sweep folder, which the loggers record; ``outcome``: filled with the run's
    summary as it ended (also where summary.json was left as it was: a resume that could not
    start)."""
    return run_jobs([(config, run_dir, choices, job)], outcome=outcome)[0]


def stop_reason(trainer: Trainer) -> str:
    if trainer.state.stopped is not None:  # a callback's request (early_stopping, or a user's reason)
        return trainer.state.stopped
    return "max_steps" if 0 < trainer.settings.max_steps <= trainer.state.step else "max_epochs"


def os_message(e: OSError) -> str:
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def runtime_message(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:  # disk full, folder removed, permission: name the path
        return f"{type(e).__name__}: {os_message(e)}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    message = f"{type(e).__name__}: {text}" if not isinstance(e, NonFiniteLoss) else text
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        message += (" — the batch does not fit on the device: lower trainer.batch_size and raise "
                    "trainer.accumulate_grad_batches to keep the same optimizer step")
    return message

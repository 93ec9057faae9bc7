"""One run from typed settings: build, train and/or evaluate, write the run folder.

Every way a run ends is written to summary.json: completed, failed (with the error) or
interrupted; the exit code is 0, 1, 2, 130 or 143 (runner/errors.py).
"""
from __future__ import annotations

import logging
import os
import random
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from rich.console import Console

from runner.config import compat
from runner.config.build import build
from runner.config import Config, Mode, TrainerConfig
from runner.config import rules
from runner.engine import checkpoint as ckpt
from runner.engine import devices
from runner.engine.devices import DeviceContext
from runner.engine.evaluate import evaluate
from runner.engine.family import DataBundle, Family, StepInParts
from runner.engine.loop import Trainer
from runner.engine.precision import set_matmul_precision
from runner.engine.predict import predict
from runner.engine.progress import metrics_table
from runner.engine.results import RunResults
from runner.engine.signals import SignalFlag
from runner.loggers import JobInfo, RunInfo
from runner.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_USER_ERROR, Interrupted, NonFiniteLoss, UserError
from runner.schedule import run_epochs

log = logging.getLogger("runner")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic kernel (adaptive average pooling's backward on
        # CUDA, in DenseNet) warns instead of stopping the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    # cuDNN times its algorithms once per input shape and keeps the fastest: shapes are fixed here.
    torch.backends.cudnn.benchmark = not deterministic


def build_data(config: Config, ctx: DeviceContext, choices: dict[str, str]) -> DataBundle:
    """The dataset's splits; a family/model/loss pair that does not fit them exits 2 first."""
    family_name = compat.family_of_dataset(config.dataset)  # runner's own datasets were checked in start()
    # Datasets that prepare batches on the device, or choose where to, take these two.
    bundle = build(config.dataset, "dataset", device=ctx.device, num_workers=int(config.trainer.num_workers))
    if not isinstance(bundle, DataBundle):
        raise UserError(f"dataset._target_ {compat.target_of(config.dataset)} did not return a DataBundle")
    if family_name is None:
        compat.check_compatible(bundle.family, choices, model=config.model, loss=config.loss)
    for split in ("train", "val", "test"):
        dataset = getattr(bundle, split)
        if (dataset is None and split == "train") or (dataset is not None and len(dataset) == 0):
            raise UserError(f"the {split} split of dataset '{compat.target_of(config.dataset)}' is empty "
                            f"(check dataset.n_{split} or the data files)")
    return bundle


def build_family(config: Config, ctx: DeviceContext, bundle: DataBundle) -> Family:
    """The family (model and loss) for the data, on the device."""
    family = compat.module_of(bundle.family).build(bundle, config.model, config.loss, seed=config.trainer.seed)
    empty = [(n, tuple(p.shape)) for n, p in family.raw_model.named_parameters() if p.numel() == 0]
    if empty:
        raise UserError(f"the model has an empty parameter, {empty[0][0]} of shape {empty[0][1]}: check the "
                        "sizes in the model's config (a width of 0?)")
    family.to(ctx.device)
    if config.trainer.channels_last:
        family.model.to(memory_format=torch.channels_last)
    return family


def test_split(family: Family, bundle: DataBundle, ctx: DeviceContext, trainer: TrainerConfig,
               results: RunResults, run_dir: Path | None, where: dict[str, Any]) -> dict[str, float]:
    """Evaluate the test split (if any) and record it; ``where``: epoch, step and weights of the row."""
    if bundle.test is None:
        return {}
    metrics, count = evaluate(family, bundle, "test", ctx, trainer)
    results.summary["eval_samples"]["test"] = count
    results.log({**where, "split": "test", **metrics})
    if ctx.is_main:
        family.after_evaluation("test", metrics, run_dir)
    return metrics


def load_trained(config: Config, family: Family, ctx: DeviceContext) -> None:
    """mode=eval / predict: the checkpoint's weights and the family's own state (thresholds
    tuned on val, the labels it was trained on)."""
    payload = ckpt.load_checkpoint(config.ckpt_path, map_location=ctx.device)
    ckpt.load_model_weights(family.raw_model, payload, config.ckpt_path)
    if payload.get("family") and hasattr(family, "load_state_dict"):
        family.load_state_dict(payload["family"])
    family.model = ctx.wrap(family.model, sync_batchnorm=False)


def evaluate_checkpoint(config: Config, family: Family, bundle: DataBundle, ctx: DeviceContext,
                        results: RunResults, run_dir: Path | None) -> None:
    """mode=eval: the checkpoint's weights on val and test."""
    load_trained(config, family, ctx)
    if bundle.val is not None:
        metrics, count = evaluate(family, bundle, "val", ctx, config.trainer)
        results.summary["metrics"].update(metrics)
        results.summary["eval_samples"]["val"] = count
        results.log({"epoch": None, "step": None, "split": "val", **metrics})
        if ctx.is_main:
            family.after_evaluation("val", metrics, run_dir)
    where = {"epoch": None, "step": None}
    results.summary["metrics"].update(test_split(family, bundle, ctx, config.trainer, results, run_dir, where))


def make_trainer(config: Config, family: Family, bundle: DataBundle, ctx: DeviceContext, results: RunResults,
                 run_dir: Path | None) -> Trainer:
    """mode=train: the model compiled and wrapped for the device strategy, and the loop's state."""
    t = config.trainer
    if t.max_epochs is None:
        t.max_epochs = run_epochs(config.schedule)
        if t.max_epochs is None:
            raise UserError("trainer.max_epochs=null needs a schedule that sets the length (schedule=iwae_paper)")
    if t.compile and isinstance(family, StepInParts) and family.compile_blocker:
        log.warning("trainer.compile=true: %s; the step runs uncompiled", family.compile_blocker)
    elif t.compile and isinstance(family, StepInParts) and not ctx.distributed:
        # The model and its loss as one compiled function: the loss's elementwise tail (IWAE's
        # logsumexp, the cross-entropy) fuses with the model's last kernels instead of running eagerly.
        family.compiled_model_and_loss = torch.compile(family.model_and_loss, mode=t.compile_mode)
        log.info("trainer.compile: the model and its loss compiled as one function (mode %s)", t.compile_mode)
    elif t.compile:
        family.model = torch.compile(family.model, mode=t.compile_mode)
        log.info("trainer.compile: the model compiled (mode %s)", t.compile_mode)
    family.model = ctx.wrap(family.model, config.device.sync_batchnorm)
    meta = {"model_target": compat.target_of(config.model),
            "config": OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)}
    return Trainer(family, bundle, ctx, t, config.optim, config.schedule, results, run_dir, meta)


def restore(config: Config, trainer: Trainer, results: RunResults) -> None:
    """mode=train: continue the run folder's last checkpoint (resume=), or start from another
    run's weights (ckpt_path=, fine-tuning)."""
    last = Path(config.resume or "") / "checkpoints" / "last.pt"
    if config.resume and last.is_file():
        trainer.restore(ckpt.load_checkpoint(last, map_location="cpu"), last)
    elif config.ckpt_path:  # fine-tuning: the weights of another run, a fresh optimizer and loop
        payload = ckpt.load_checkpoint(config.ckpt_path, map_location="cpu")
        skipped = ckpt.load_model_weights(trainer.family.raw_model, payload, config.ckpt_path,
                                          strict=config.ckpt_strict)
        log.warning("initialised the weights from %s%s", config.ckpt_path,
                    f" (left {len(skipped)} tensors as built: {', '.join(skipped[:5])})" if skipped else "")
    if config.resume:
        results.resumed(trainer.state.step)
        results.write_summary(status="running")


def test_trained(config: Config, trainer: Trainer, results: RunResults, run_dir: Path | None) -> None:
    """mode=train, after fitting: test the best weights by the monitored metric where validation
    chose some (else the last), and put the final metrics in the summary."""
    if trainer.error is not None:  # the loop ended this run early: its own failure
        raise trainer.error
    t, family, bundle, ctx = config.trainer, trainer.family, trainer.bundle, trainer.ctx
    # Only rank 0 knows the run folder: it tells the others (identity under one process).
    best = run_dir / "checkpoints" / "best.pt" if run_dir is not None else None
    path = ctx.broadcast_object(str(best) if best is not None and best.is_file() else None)
    if path is None and trainer.closed_weights is not None:
        path = trainer.closed_weights  # a fused job that closed before its group: its weights at that step
    if path is not None:
        ckpt.load_model_weights(family.raw_model, ckpt.load_checkpoint(path, ctx.device), path)
    where = {"epoch": trainer.state.epoch, "step": trainer.state.step, "weights": "best" if best is not None
             and path == str(best) else "last"}
    test_metrics = test_split(family, bundle, ctx, t, results, run_dir, where)
    if bundle.test is not None:
        results.summary["test_weights"] = where["weights"]
    results.summary["metrics"].update({**trainer.final_metrics, **test_metrics})
    results.summary["eval_samples"].update(trainer.eval_samples)
    if not t.keep_last and run_dir is not None:  # a completed run that will not be extended
        (run_dir / "checkpoints" / "last.pt").unlink(missing_ok=True)


class RunLife:
    """One run from its typed settings to its summary.json and exit code: ``start`` checks the
    settings and builds the run (mode=eval and predict finish there), the caller trains the
    returned Trainer (alone, or fused with others: runner/engine/fused.py), ``test`` tests it,
    ``fail`` records whatever ended it, and ``close`` writes the summary and returns the code."""

    def __init__(self, config: Config, run_dir: Path | None, choices: dict[str, str] | None = None,
                 console: Console | None = None, job: JobInfo | None = None):
        self.config, self.run_dir, self.choices = config, run_dir, choices or {}
        self.console = console or Console(quiet=int(os.environ.get("RANK", "0")) != 0)  # rank 0 speaks for all
        self.results = RunResults(run_dir, run=RunInfo.of(config, run_dir, choices, job), logger=config.logger)
        self.ctx: DeviceContext | None = None
        self.bundle: DataBundle | None = None
        self.trainer: Trainer | None = None
        self.status, self.code = "running", EXIT_OK

    def start(self) -> Trainer | None:
        """Everything before training: the Trainer in mode=train, None once mode=eval or
        predict has run."""
        family = self.prepare()
        return None if family is None else self.make_trainer(family)

    def prepare(self, bundle: DataBundle | None = None) -> Family | None:
        """Checks, device, seed, data and family (``bundle``: data already built, which a fused
        group shares); mode=eval and predict run here and return None."""
        config, results = self.config, self.results
        rules.check(config, self.choices)
        ctx = self.ctx = devices.resolve(config.device.strategy, config.device.index, config.device.backend)
        rules.check_device(config, ctx.device.type, ctx.world_size)
        results.summary["device"] = ctx.describe()
        if ctx.is_main and self.run_dir is not None:  # first, so that a slow start is not a silent one
            self.console.print(f"run folder: {self.run_dir}\ndevice: {results.summary['device']}", highlight=False,
                               markup=False, soft_wrap=True)
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
        if config.mode == Mode.eval:
            evaluate_checkpoint(config, family, self.bundle, ctx, results, self.run_dir)
            return None
        if config.mode == Mode.predict:
            load_trained(config, family, ctx)
            results.summary["predictions"] = predict(family, self.bundle, ctx, config.trainer, self.run_dir)
            return None
        return family

    def make_trainer(self, family: Family) -> Trainer:
        """mode=train: the loop's state, continued from the run folder (resume=) or from another
        run's weights (ckpt_path=)."""
        self.trainer = make_trainer(self.config, family, self.bundle, self.ctx, self.results, self.run_dir)
        restore(self.config, self.trainer, self.results)
        return self.trainer

    def test(self) -> None:
        if self.trainer is not None:
            test_trained(self.config, self.trainer, self.results, self.run_dir)
        self.status = "completed"

    def fail(self, e: BaseException) -> None:
        """Record what ended the run: a user error (exit 2), an interrupt (130 / 143), or a
        run-time failure (exit 1, one line on the terminal, the traceback in run.log)."""
        results, console = self.results, self.console
        if isinstance(e, UserError):
            self.status, self.code = "failed", EXIT_USER_ERROR
            results.summary["error"] = str(e)
            log.info("user error: %s", e)  # run.log only; the terminal gets the one line below
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        elif isinstance(e, Interrupted):
            self.status, self.code = "interrupted", e.exit_code
            results.summary["error"] = str(e)
            done = "training's last checkpoint kept" if e.during else "checkpoint written to checkpoints/last.pt"
            console.print(f"[yellow]{e}: {done}; continue with resume={self.run_dir}")
        elif isinstance(e, KeyboardInterrupt):
            self.status, self.code = "interrupted", EXIT_SIGINT
            results.summary["error"] = "interrupted by a second SIGINT (no checkpoint of the current step)"
        else:
            self.status, self.code = "failed", EXIT_FAILED
            message = runtime_message(e)
            results.summary["error"] = message
            log.info("run failed: %s\n%s", message, "".join(traceback.format_exception(e)))  # run.log only
            where = f" (traceback in {self.run_dir / 'run.log'})" if self.run_dir is not None else ""
            console.print(f"[bold red]failed:[/] {message}{where}", highlight=False, soft_wrap=True)

    def close(self) -> int:
        """Write the summary (any status), finish the loggers; the exit code."""
        trainer, results, status, ctx = self.trainer, self.results, self.status, self.ctx
        if trainer is not None:
            # Folding in the other processes' counts is a collective: skip it when a process
            # failed, since the others may never reach it.
            if not (status == "failed" and ctx is not None and ctx.distributed):
                trainer.sync_counts()
            s, seconds = trainer.state, trainer.clock.train_s
            results.summary["stop_reason"] = trainer.stop_reason() if status == "completed" else status
            results.summary.update(steps=s.step, samples_seen=s.samples_seen, epochs=s.epoch,
                                   skipped_steps=s.skipped_steps, unit=trainer.family.unit,
                                   throughput=round(s.samples_seen / seconds, 3) if seconds else None)
        try:
            results.write_summary(status=status)
            results.finish()
        except OSError as e:  # the disk filled or the folder went away: say so in one line
            self.status, self.code = "failed", EXIT_FAILED
            self.console.print(f"[bold red]failed:[/] cannot write the run's results: {os_message(e)}",
                               highlight=False, soft_wrap=True)
        if self.status == "completed" and results.enabled:
            self.console.print(f"[bold]{results.title}: final metrics", soft_wrap=True)
            self.console.print(metrics_table(results.summary["metrics"]))
            self.console.print(f"run folder: {self.run_dir}", soft_wrap=True)
        return self.code


def run(config: Config, run_dir: Path | None, choices: dict[str, str] | None = None,
        console: Console | None = None, job: JobInfo | None = None) -> int:
    """Run one job; returns the exit code. ``run_dir`` is None on processes other than rank 0;
    ``choices`` names the option chosen in each group (for messages); ``job``: the job's
    overrides and sweep folder, which the loggers record."""
    life = RunLife(config, run_dir, choices, console, job)
    try:
        trainer = life.start()
        if trainer is not None:
            with SignalFlag(distributed=trainer.ctx.distributed) as stop:
                trainer.fit(stop)
                with stop.immediate("the test evaluation"):
                    life.test()
        else:
            life.test()
    except (Exception, KeyboardInterrupt) as e:
        life.fail(e)
    finally:
        code = life.close()
        devices.shutdown()  # also for a one-process ddp group
    return code


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

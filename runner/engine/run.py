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

from runner.engine import compat
from runner.build import build
from runner.config import LOGGERS, PRECISIONS, PROGRESS, Config, Mode, TrainerConfig
from runner.engine import checkpoint as ckpt
from runner.engine import devices
from runner.engine.devices import DeviceContext
from runner.engine.evaluate import evaluate
from runner.engine.family import DataBundle, Family
from runner.engine.loop import Trainer
from runner.engine.precision import set_matmul_precision
from runner.engine.progress import metrics_table
from runner.engine.results import RunResults
from runner.engine.signals import SignalFlag
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


NEVER = {"val_every_n_steps": "at the end of each epoch", "ckpt_every_n_steps": "at the end of each epoch",
         "num_workers": "load in the main process"}


def validate(config: Config) -> None:
    """Checks Hydra's types cannot express: ranges and choices, with the key named."""
    t = config.trainer
    for key in ("batch_size", "accumulate_grad_batches", "log_every_n_steps"):
        if getattr(t, key) <= 0:
            raise UserError(f"trainer.{key}={getattr(t, key)} must be > 0")
    if t.eval_batch_size is not None and t.eval_batch_size <= 0:
        raise UserError(f"trainer.eval_batch_size={t.eval_batch_size} must be > 0 (or null)")
    if t.max_epochs is not None and t.max_epochs <= 0:
        raise UserError(f"trainer.max_epochs={t.max_epochs} must be > 0 (or null: as long as the schedule says)")
    for key, allowed in (("precision", PRECISIONS), ("progress", PROGRESS)):
        if str(getattr(t, key)) not in allowed:
            raise UserError(f"trainer.{key}={getattr(t, key)!r} is not known; allowed: {', '.join(allowed)}")
    if t.steps_per_graph < 1:
        raise UserError(f"trainer.steps_per_graph={t.steps_per_graph} must be >= 1")
    if t.steps_per_graph > 1 and not (t.cuda_graph and t.data_on_device):
        raise UserError(f"trainer.steps_per_graph={t.steps_per_graph} needs trainer.cuda_graph=true and "
                        "trainer.data_on_device=true (the batches of a launch are cut on the device)")
    if t.gradient_clip_val < 0:
        raise UserError(f"trainer.gradient_clip_val={t.gradient_clip_val} must be >= 0")
    if config.logger not in LOGGERS:
        raise UserError(f"logger={config.logger!r} is not known; allowed: {', '.join(LOGGERS)}")
    if config.mode == Mode.eval and not config.ckpt_path:
        raise UserError("mode=eval needs ckpt_path=<run folder>/checkpoints/best.pt")
    if config.ckpt_path and not Path(config.ckpt_path).is_file():
        raise UserError(f"ckpt_path={config.ckpt_path}: no such file")
    for key in ("val_every_n_steps", "ckpt_every_n_steps", "num_workers"):
        if getattr(t, key) < 0:
            raise UserError(f"trainer.{key}={getattr(t, key)} must be >= 0 (0: {NEVER[key]})")
    for key in ("max_steps", "limit_train_batches"):
        if getattr(t, key) == 0 or getattr(t, key) < -1:
            raise UserError(f"trainer.{key}={getattr(t, key)} must be > 0, or -1 for no limit")


def build_family(config: Config, ctx: DeviceContext, choices: dict[str, str]) -> tuple[DataBundle, Family]:
    """The data, then the family (model and loss) that fits it; incompatible pairs exit 2 first."""
    parts = {"model": config.model, "loss": config.loss}
    family_name = compat.family_of_dataset(config.dataset)
    if family_name is not None:  # runner's own dataset: checked before anything is built
        compat.check_compatible(family_name, choices, **parts)
    # Datasets that prepare batches on the device, or choose where to, take these two.
    bundle = build(config.dataset, "dataset", device=ctx.device, num_workers=int(config.trainer.num_workers))
    if not isinstance(bundle, DataBundle):
        raise UserError(f"dataset._target_ {compat.target_of(config.dataset)} did not return a DataBundle")
    if family_name is None:
        compat.check_compatible(bundle.family, choices, **parts)
    for split in ("train", "val", "test"):
        dataset = getattr(bundle, split)
        if dataset is not None and len(dataset) == 0:
            raise UserError(f"the {split} split of dataset '{compat.target_of(config.dataset)}' is empty")
    family = compat.module_of(bundle.family).build(bundle, config.model, config.loss, seed=config.trainer.seed)
    family.to(ctx.device)
    if config.trainer.channels_last:
        family.model.to(memory_format=torch.channels_last)
    return bundle, family


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


def evaluate_checkpoint(config: Config, family: Family, bundle: DataBundle, ctx: DeviceContext,
                        results: RunResults, run_dir: Path | None) -> None:
    """mode=eval: the checkpoint's weights on val and test."""
    payload = ckpt.load_checkpoint(config.ckpt_path, map_location=ctx.device)
    ckpt.load_model_weights(family.raw_model, payload, config.ckpt_path)
    family.model = ctx.wrap(family.model, sync_batchnorm=False)
    if bundle.val is not None:
        metrics, count = evaluate(family, bundle, "val", ctx, config.trainer)
        results.summary["metrics"].update(metrics)
        results.summary["eval_samples"]["val"] = count
        results.log({"epoch": None, "step": None, "split": "val", **metrics})
        if ctx.is_main:
            family.after_evaluation("val", metrics, run_dir)
    where = {"epoch": None, "step": None}
    results.summary["metrics"].update(test_split(family, bundle, ctx, config.trainer, results, run_dir, where))


def train(config: Config, family: Family, bundle: DataBundle, ctx: DeviceContext, results: RunResults,
          run_dir: Path | None) -> Trainer:
    """mode=train: fit (resuming where the run folder left off), then test the best weights."""
    t = config.trainer
    if t.max_epochs is None:
        t.max_epochs = run_epochs(config.schedule)
        if t.max_epochs is None:
            raise UserError("trainer.max_epochs=null needs a schedule that sets the length (schedule=iwae_paper)")
    if t.compile:
        family.model = torch.compile(family.model)
    family.model = ctx.wrap(family.model, config.device.sync_batchnorm)
    meta = {"model_target": compat.target_of(config.model),
            "config": OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)}
    trainer = Trainer(family, bundle, ctx, t, config.optim, config.schedule, results, run_dir, meta)
    last = Path(config.resume or "") / "checkpoints" / "last.pt"
    if config.resume and last.is_file():
        trainer.restore(ckpt.load_checkpoint(last, map_location="cpu"), last)
    elif config.ckpt_path:  # fine-tuning: the weights of another run, a fresh optimizer and loop
        payload = ckpt.load_checkpoint(config.ckpt_path, map_location="cpu")
        skipped = ckpt.load_model_weights(family.raw_model, payload, config.ckpt_path, strict=config.ckpt_strict)
        log.warning("initialised the weights from %s%s", config.ckpt_path,
                    f" (left {len(skipped)} tensors as built: {', '.join(skipped[:5])})" if skipped else "")
    if config.resume:
        results.resumed(trainer.state.step)
        results.write_summary(status="running")
    with SignalFlag() as stop:
        trainer.fit(stop)
    # Test the best weights by the monitored metric where validation chose some. Only rank 0
    # knows the run folder: it tells the others (identity under one process).
    best = run_dir / "checkpoints" / "best.pt" if run_dir is not None else None
    path = ctx.broadcast_object(str(best) if best is not None and best.is_file() else None)
    if path is not None:
        ckpt.load_model_weights(family.raw_model, ckpt.load_checkpoint(path, ctx.device), path)
    where = {"epoch": trainer.state.epoch, "step": trainer.state.step, "weights": "best" if path else "last"}
    test_metrics = test_split(family, bundle, ctx, t, results, run_dir, where)
    if bundle.test is not None:
        results.summary["test_weights"] = where["weights"]
    results.summary["metrics"].update({**trainer.final_metrics, **test_metrics})
    results.summary["eval_samples"].update(trainer.eval_samples)
    return trainer


def run(config: Config, run_dir: Path | None, choices: dict[str, str] | None = None,
        console: Console | None = None) -> int:
    """Run one job; returns the exit code. ``run_dir`` is None on processes other than rank 0;
    ``choices`` names the option chosen in each group (for messages)."""
    console = console or Console()
    results = RunResults(run_dir, logger=config.logger)
    ctx, trainer, code = None, None, EXIT_OK
    try:
        validate(config)
        ctx = devices.resolve(config.device.strategy, config.device.index, config.device.backend)
        results.summary["device"] = ctx.describe()
        if not ctx.is_main:
            results = RunResults(None)
        if config.resume:
            results.hold()
        results.write_summary(status="running")
        log.info("run folder %s, device %s\n%s", run_dir, results.summary["device"],
                 OmegaConf.to_yaml(OmegaConf.structured(config)))
        seed_everything(config.trainer.seed, config.trainer.deterministic)
        set_matmul_precision(config.trainer.precision)
        bundle, family = build_family(config, ctx, choices or {})
        if config.mode == Mode.eval:
            evaluate_checkpoint(config, family, bundle, ctx, results, run_dir)
        else:
            trainer = train(config, family, bundle, ctx, results, run_dir)
        status = "completed"
    except UserError as e:
        status, code = "failed", EXIT_USER_ERROR
        results.summary["error"] = str(e)
        log.info("user error: %s", e)  # run.log only; the terminal gets the one line below
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    except Interrupted as e:
        status, code = "interrupted", e.exit_code
        results.summary["error"] = str(e)
        console.print(f"[yellow]{e}: checkpoint written to checkpoints/last.pt; continue with resume={run_dir}")
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_SIGINT
        results.summary["error"] = "interrupted by a second SIGINT (no checkpoint of the current step)"
    except Exception as e:
        status, code = "failed", EXIT_FAILED
        message = runtime_message(e)
        results.summary["error"] = message
        log.info("run failed: %s\n%s", message, traceback.format_exc())  # the traceback goes to run.log only
        where = f" (traceback in {run_dir / 'run.log'})" if run_dir is not None else ""
        console.print(f"[bold red]failed:[/] {message}{where}", highlight=False, soft_wrap=True)
    finally:
        if trainer is not None:
            # Folding in the other processes' counts is a collective: skip it when a process
            # failed, since the others may never reach it.
            if not (status == "failed" and ctx is not None and ctx.distributed):
                trainer.sync_counts()
            s, seconds = trainer.state, trainer.clock.train_s
            results.summary.update(steps=s.step, samples_seen=s.samples_seen, epochs=s.epoch,
                                   skipped_steps=s.skipped_steps, unit=trainer.family.unit,
                                   throughput=round(s.samples_seen / seconds, 3) if seconds else None)
        results.write_summary(status=status)
        results.finish(config.name)
        devices.shutdown()  # also for a one-process ddp group
    if status == "completed" and results.enabled:
        console.print(f"[bold]{config.name}: final metrics", soft_wrap=True)
        console.print(metrics_table(results.summary["metrics"]))
        console.print(f"run folder: {run_dir}", soft_wrap=True)
    return code


def runtime_message(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    message = f"{type(e).__name__}: {text}" if not isinstance(e, NonFiniteLoss) else text
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        message += (" — the batch does not fit on the device: lower trainer.batch_size and raise "
                    "trainer.accumulate_grad_batches to keep the same optimizer step")
    return message

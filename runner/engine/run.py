"""One run from a composed config: build, train and/or evaluate, write the run folder.

Every way a run ends is written to summary.json: completed, failed (with the error) or
interrupted; the exit code follows DESIGN.md (0, 1, 2, 130, 143).
"""
from __future__ import annotations

import importlib
import logging
import os
import random
import signal
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from runner.build import build
from runner.engine import checkpoint as ckpt
from runner.engine import devices
from runner.engine.family import DataBundle, Family
from runner.engine.loop import Interrupted, NonFiniteLoss, SignalFlag, Trainer, evaluate
from runner.engine.progress import metrics_table
from runner.engine.results import RunResults
from runner.errors import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USER_ERROR, UserError
from runner.optim import schedule_epochs

log = logging.getLogger("runner")
FAMILIES = ("multilabel", "density", "charlm", "regression")


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


def set_matmul_precision(precision: str) -> None:
    """TF32 matrix products for trainer.precision=tf32, full fp32 ones otherwise (set per run:
    the setting is process-wide and runs may share a process)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"


def validate(cfg: DictConfig) -> None:
    """Checks Hydra's types cannot express: ranges and choices, with the key named."""
    t = cfg.trainer
    for key in ("batch_size", "accumulate_grad_batches", "log_every_n_steps"):
        if t[key] <= 0:
            raise UserError(f"trainer.{key}={t[key]} must be > 0")
    if t.eval_batch_size is not None and t.eval_batch_size <= 0:
        raise UserError(f"trainer.eval_batch_size={t.eval_batch_size} must be > 0 (or null)")
    if str(t.precision) not in ("32", "tf32", "bf16", "16"):
        raise UserError(f"trainer.precision={t.precision!r} is not known; allowed: 32, tf32, bf16, 16")
    if t.steps_per_graph < 1:
        raise UserError(f"trainer.steps_per_graph={t.steps_per_graph} must be >= 1")
    if t.steps_per_graph > 1 and not (t.cuda_graph and t.data_on_device):
        raise UserError(f"trainer.steps_per_graph={t.steps_per_graph} needs trainer.cuda_graph=true and "
                        "trainer.data_on_device=true (the batches of a launch are cut on the device)")
    if t.gradient_clip_val < 0:
        raise UserError(f"trainer.gradient_clip_val={t.gradient_clip_val} must be >= 0")
    if t.progress not in ("auto", "rich", "plain", "none"):
        raise UserError(f"trainer.progress={t.progress!r} is not known; allowed: auto, rich, plain, none")
    if cfg.logger not in ("csv", "tensorboard"):
        raise UserError(f"logger={cfg.logger!r} is not known; allowed: csv, tensorboard")
    if str(getattr(cfg.mode, "value", cfg.mode)) == "eval" and not cfg.ckpt_path:
        raise UserError("mode=eval needs ckpt_path=<run folder>/checkpoints/best.pt")


def build_family(cfg: DictConfig, bundle: DataBundle) -> Family:
    if not isinstance(bundle, DataBundle):
        raise UserError(f"dataset._target_ {cfg.dataset._target_} did not return a DataBundle")
    # A family outside runner plugs in by its module path ("mypackage.myfamily").
    if bundle.family not in FAMILIES and "." not in bundle.family:
        raise UserError(f"dataset family {bundle.family!r} is not known; allowed: {', '.join(FAMILIES)}")
    for split in ("train", "val", "test"):
        dataset = getattr(bundle, split)
        if dataset is not None and len(dataset) == 0:
            raise UserError(f"the {split} split of dataset '{cfg.dataset._target_}' is empty")
    name = bundle.family if "." in bundle.family else f"runner.families.{bundle.family}"
    module = importlib.import_module(name)
    return module.build(cfg, bundle)


def run(cfg: DictConfig, run_dir: Path | None, console: Console | None = None) -> int:
    """Run one job; returns the exit code. ``run_dir`` is None on processes other than rank 0."""
    console = console or Console()
    results = RunResults(run_dir, logger=str(cfg.get("logger", "csv")))
    ctx = None
    code = EXIT_OK
    trainer = None
    try:
        validate(cfg)
        ctx = devices.resolve(cfg.device.strategy, cfg.device.index, cfg.device.backend)
        results.summary["device"] = ctx.describe()
        if not ctx.is_main:
            results = RunResults(None)
        results.write_summary(status="running")
        log.info("run folder %s, device %s\n%s", run_dir, results.summary["device"], OmegaConf.to_yaml(cfg))
        t = cfg.trainer
        seed_everything(t.seed, t.deterministic)
        set_matmul_precision(str(t.precision))
        # Datasets that prepare batches on the device, or choose where to, take these two.
        bundle = build(cfg.dataset, "dataset", device=ctx.device, num_workers=int(t.num_workers))
        family = build_family(cfg, bundle)
        family.to(ctx.device)
        if t.channels_last:
            family.model.to(memory_format=torch.channels_last)
        mode = str(getattr(cfg.mode, "value", cfg.mode))
        if mode == "eval":
            payload = ckpt.load_checkpoint(cfg.ckpt_path, map_location=ctx.device)
            ckpt.load_model_weights(family.raw_model, payload, cfg.ckpt_path)
            family.model = ctx.wrap(family.model, sync_batchnorm=False)
            for split in ("val", "test"):
                if getattr(bundle, split) is not None:
                    metrics, count = evaluate(family, bundle, split, cfg, ctx)
                    results.summary["metrics"].update(metrics)
                    results.summary["eval_samples"][split] = count
                    results.log({"epoch": None, "step": None, "split": split, **metrics})
                    if ctx.is_main:
                        family.after_evaluation(split, metrics, run_dir)
        else:
            if t.max_epochs is None:
                epochs = schedule_epochs(cfg.schedule)
                if epochs is None:
                    raise UserError("trainer.max_epochs=null needs a schedule that sets the length (schedule=iwae_paper)")
                cfg.trainer.max_epochs = epochs
            elif t.max_epochs <= 0:
                raise UserError(f"trainer.max_epochs={t.max_epochs} must be > 0")
            if t.compile:
                family.model = torch.compile(family.model)
            family.model = ctx.wrap(family.model, cfg.device.sync_batchnorm)
            trainer = Trainer(family, bundle, cfg, ctx, results, run_dir)
            if cfg.resume:
                last = Path(cfg.resume) / "checkpoints" / "last.pt"
                if last.is_file():
                    trainer.restore(ckpt.load_checkpoint(last, map_location="cpu"), last)
            with SignalFlag() as stop:
                trainer.fit(stop)
            test_metrics = {}
            if bundle.test is not None:
                # Test the best weights by the monitored metric where validation chose some.
                best = run_dir / "checkpoints" / "best.pt" if run_dir is not None else None
                source = "last"
                # Only rank 0 knows the run folder: it tells the others (identity under one process).
                path = ctx.broadcast_object(str(best) if best is not None and best.is_file() else None)
                if path is not None:
                    ckpt.load_model_weights(family.raw_model, ckpt.load_checkpoint(path, ctx.device), path)
                    source = "best"
                test_metrics, count = evaluate(family, bundle, "test", cfg, ctx)
                trainer.eval_samples["test"] = count
                results.log({"epoch": trainer.state.epoch, "step": trainer.state.step, "split": "test",
                             "weights": source, **test_metrics})
                if ctx.is_main:
                    family.after_evaluation("test", test_metrics, run_dir)
                results.summary["test_weights"] = source
            results.summary["metrics"].update(trainer.final_metrics)
            results.summary["metrics"].update(test_metrics)
            results.summary["eval_samples"].update(trainer.eval_samples)
        status = "completed"
    except UserError as e:
        status, code = "failed", EXIT_USER_ERROR
        results.summary["error"] = str(e)
        log.info("user error: %s", e)  # run.log only; the terminal gets the one line below
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    except Interrupted as e:
        status = "interrupted"
        code = EXIT_SIGINT if e.signum == signal.SIGINT else EXIT_SIGTERM
        results.summary["error"] = str(e)
        console.print(f"[yellow]{e}: checkpoint written to checkpoints/last.pt; continue with resume={run_dir}")
    except KeyboardInterrupt:
        status, code = "interrupted", EXIT_SIGINT
        results.summary["error"] = "interrupted by a second SIGINT (no checkpoint of the current step)"
    except Exception as e:
        status, code = "failed", EXIT_FAILED
        message = _runtime_message(e)
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
            s = trainer.state
            results.summary.update(steps=s.step, samples_seen=s.samples_seen, epochs=s.epoch,
                                   skipped_steps=s.skipped_steps, unit=trainer.family.unit,
                                   throughput=round(s.samples_seen / trainer.train_seconds, 3) if trainer.train_seconds else None)
        results.write_summary(status=status)
        results.finish(cfg)
        devices.shutdown()  # also for a one-process ddp group
    if status == "completed" and results.enabled:
        console.print(f"[bold]{cfg.name}: final metrics", soft_wrap=True)
        console.print(metrics_table(results.summary["metrics"]))
        console.print(f"run folder: {run_dir}", soft_wrap=True)
    return code


def _runtime_message(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    message = f"{type(e).__name__}: {text}" if not isinstance(e, NonFiniteLoss) else text
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        message += (" — the batch does not fit on the device: lower trainer.batch_size and raise "
                    "trainer.accumulate_grad_batches to keep the same optimizer step")
    return message

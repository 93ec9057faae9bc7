"""Every rule a job's settings must satisfy, checked before anything is built: a broken rule is
one line naming the key and what is allowed (``UserError``: exit 2), and nothing runs.

``check(config, choices)`` holds the rules that the settings alone decide (ranges, choices,
combinations, the loggers, a family/model/loss pair of runner's own options); ``check_device``
those that need the device the run got; ``fusion_blocker`` says why a job cannot train fused
with others. The engine trusts what passed here. Keys of ``_target_`` nodes (dataset, model,
loss, optim, schedule, loggers, callbacks) are checked against their target's signature when
they are built (runner/config/build.py).
"""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from runner.config import compat
from runner.config.build import checked_kwargs, number_problem
from runner.config.schema import COMPILE_MODES, PRECISIONS, PROGRESS, Config, Mode, Strategy
from runner.errors import UserError

NEVER = {"val_every_n_steps": "at the end of each epoch", "ckpt_every_n_steps": "at the end of each epoch",
         "num_workers": "load in the main process"}


def check(config: Config, choices: dict[str, str]) -> None:
    """The rules of the settings alone (see the module docstring)."""
    from runner.loggers import check_loggers

    check_numbers(config.trainer, "trainer")
    check_numbers(config.device, "device")
    check_trainer(config)
    check_modes(config)
    check_launch(config)
    check_tags(config)
    warn_fine_tune_of_last(config)
    if config.device.sync_batchnorm and not (config.device.strategy == Strategy.ddp and config.device.backend == "nccl"):
        raise UserError("device.sync_batchnorm=true synchronises BatchNorm across GPU processes: it needs device=ddp "
                        "with device.backend=nccl")
    check_loggers(config.logger)  # unknown keys, missing packages: exit 2 before anything starts
    if config.mode == Mode.train:  # built in the loop, after the data and the model: their keys and values first
        from runner import optim, schedule

        checked_kwargs(config.optim, "optim", extra={"params": None}, own_keys=optim.OWN_KEYS)
        checked_kwargs(config.schedule, "schedule", extra={"optimizer": None}, own_keys=schedule.OWN_KEYS,
                       fill={"total_steps": 1, "T_max": 1})
    family = compat.family_of_dataset(config.dataset)
    if family is not None:  # runner's own dataset: an incompatible pair stops before anything runs
        compat.check_compatible(family, choices, model=config.model, loss=config.loss)


def check_numbers(settings: Any, prefix: str) -> None:
    """Every number of a settings dataclass finite and within int64: NaN passes every range check
    below (NaN < 0 is false), and an integer past int64 fails deep inside torch."""
    for f in fields(settings):
        value, key = getattr(settings, f.name), f"{prefix}.{f.name}"
        if is_dataclass(value):
            check_numbers(value, key)
        elif number_problem(value):
            raise UserError(f"{key}={value} {number_problem(value)}")


def check_launch(config: Config) -> None:
    """Several processes started by torchrun or srun are one run only under device=ddp: with any
    other strategy each would train alone (and all but rank 0 would write nothing)."""
    from runner.engine.slurm import world_size

    world = world_size()
    if world > 1 and config.device.strategy != Strategy.ddp:
        raise UserError(f"{world} processes were started for this run (torchrun, or srun's tasks: SLURM_NTASKS) but "
                        f"device={config.device.strategy.value} runs one: use device=ddp, or start one task "
                        "(hydra.launcher.tasks_per_node=1)")


def warn_fine_tune_of_last(config: Config) -> None:
    """lightning-hydra-template's ``ckpt_path=<run>/checkpoints/last.ckpt`` resumes that run; runner's
    ``ckpt_path`` starts a new run from the weights. Said once where the checkpoint is a run's last.pt."""
    import logging

    from runner.engine.slurm import process_rank

    path = Path(str(config.ckpt_path)) if config.ckpt_path else None
    if (config.mode == Mode.train and path is not None and path.name == "last.pt" and path.parent.name == "checkpoints"
            and (path.parent.parent / ".hydra" / "config.yaml").is_file() and process_rank() == 0):
        logging.getLogger("runner").warning(
            "ckpt_path=%s starts a new run from those weights (fresh optimizer, schedule and step count: "
            "fine-tuning); to continue that run in its folder use resume=%s", path, path.parent.parent)


def check_tags(config: Config) -> None:
    """Top-level ``tags`` go to every tracker: W&B takes tags of 1-64 characters."""
    for i, tag in enumerate(config.tags):
        if not str(tag).strip() or len(str(tag)) > 64:
            raise UserError(f"tags[{i}]={tag!r}: a tag is 1 to 64 characters (tags=[seed_sweep,baseline])")


def check_trainer(config: Config) -> None:
    t = config.trainer
    for key in ("batch_size", "accumulate_grad_batches", "log_every_n_steps", "ckpt_every_n_epochs"):
        if getattr(t, key) <= 0:
            raise UserError(f"trainer.{key}={getattr(t, key)} must be > 0")
    if t.eval_batch_size is not None and t.eval_batch_size <= 0:
        raise UserError(f"trainer.eval_batch_size={t.eval_batch_size} must be > 0 (or null)")
    if t.max_epochs is not None and t.max_epochs <= 0:
        raise UserError(f"trainer.max_epochs={t.max_epochs} must be > 0 (or null: as long as the schedule says)")
    for key, allowed in (("precision", PRECISIONS), ("progress", PROGRESS), ("compile_mode", COMPILE_MODES)):
        if str(getattr(t, key)) not in allowed:
            raise UserError(f"trainer.{key}={getattr(t, key)!r} is not known; allowed: {', '.join(allowed)}")
    if t.steps_per_graph < 1:
        raise UserError(f"trainer.steps_per_graph={t.steps_per_graph} must be >= 1")
    if t.steps_per_graph > 1 and not (t.cuda_graph and t.data_on_device):
        raise UserError(f"trainer.steps_per_graph={t.steps_per_graph} needs trainer.cuda_graph=true and "
                        "trainer.data_on_device=true (the batches of a launch are cut on the device)")
    if t.compile_mode != "default" and not t.compile:
        raise UserError(f"trainer.compile_mode={t.compile_mode} is the mode of torch.compile: it needs trainer.compile=true")
    if t.compile_mode in COMPILE_MODES[2:] and t.cuda_graph:
        raise UserError(f"trainer.compile_mode={t.compile_mode} captures CUDA graphs of its own, which cannot sit inside "
                        "trainer.cuda_graph's capture: with trainer.cuda_graph=true use "
                        "trainer.compile_mode=max-autotune-no-cudagraphs")
    if t.compile_optimizer and t.precision == "16":
        raise UserError("trainer.compile_optimizer=true does not combine with trainer.precision=16 (its grad scaler "
                        "steps the optimizer itself); use trainer.precision=bf16, or trainer.compile_optimizer=false")
    if t.gradient_clip_val < 0:
        raise UserError(f"trainer.gradient_clip_val={t.gradient_clip_val} must be >= 0 (0: no clipping)")
    if t.early_stopping.min_delta < 0:
        raise UserError(f"trainer.early_stopping.min_delta={t.early_stopping.min_delta} must be >= 0")
    for key, value, zero in (("early_stopping.patience", t.early_stopping.patience, "never stop early"),
                             ("save_top_k", t.save_top_k, "no best checkpoint")):
        if value < 0:
            raise UserError(f"trainer.{key}={value} must be >= 0 (0: {zero})")
    for key in ("val_every_n_steps", "ckpt_every_n_steps", "num_workers"):
        if getattr(t, key) < 0:
            raise UserError(f"trainer.{key}={getattr(t, key)} must be >= 0 (0: {NEVER[key]})")
    if t.max_steps == 0 or t.max_steps < -1:
        raise UserError(f"trainer.max_steps={t.max_steps} must be > 0, or -1 for no limit")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        limit = getattr(t, key)
        whole = isinstance(limit, int) and not isinstance(limit, bool) and (limit >= 1 or limit == -1)
        fraction = isinstance(limit, float) and 0.0 < limit <= 1.0
        if not (whole or fraction):
            raise UserError(f"trainer.{key}={limit!r} must be a number of batches (1, 2, ...), a fraction of the "
                            "split in (0, 1] (0.2), or -1 for all of it")
    if t.overfit_batches < 0:
        raise UserError(f"trainer.overfit_batches={t.overfit_batches} must be >= 0 (0: off)")


def check_modes(config: Config) -> None:
    if config.mode in (Mode.eval, Mode.predict) and not config.ckpt_path:
        raise UserError(f"mode={config.mode.value} needs ckpt_path=<run folder>/checkpoints/best.pt")
    if config.ckpt_path and not Path(config.ckpt_path).is_file():
        raise UserError(f"ckpt_path={config.ckpt_path}: no such file")


def check_device(config: Config, device_type: str, world_size: int) -> None:
    """The rules that need the device the run got (``device=auto`` decides at start-up)."""
    t = config.trainer
    if t.cuda_graph and config.mode == Mode.train:
        reason = capture_unsupported(device_type, world_size, t.accumulate_grad_batches, t.skip_nonfinite, t.precision)
        if reason:
            raise UserError(reason)


def capture_unsupported(device_type: str, world_size: int, accumulate: int, skip_nonfinite: bool,
                        precision: str) -> str | None:
    """Why the step cannot be captured in a CUDA graph (runner/engine/graphs.py), or None."""
    if device_type != "cuda":
        return "trainer.cuda_graph needs a CUDA device"
    if world_size > 1:
        return "trainer.cuda_graph runs in one process (not with device=ddp)"
    if accumulate != 1:
        return "trainer.cuda_graph needs trainer.accumulate_grad_batches=1"
    if skip_nonfinite:
        return "trainer.cuda_graph cannot skip non-finite steps (it never looks at the loss on the host)"
    if precision == "16":
        return "trainer.cuda_graph does not support trainer.precision=16 (its grad scaler reads on the host); use bf16"
    return None


def fusion_blocker(config: Config) -> str | None:
    """Why this job cannot train fused with others (runner/engine/fused.py), or None where it can."""
    t = config.trainer
    if config.mode != Mode.train:
        return f"mode={config.mode.value} does not train"
    if config.device.strategy == Strategy.ddp:
        return "device=ddp runs one job over several processes"
    if t.accumulate_grad_batches != 1 or t.skip_nonfinite or t.precision == "16":
        return "fused steps need accumulate_grad_batches=1, skip_nonfinite=false and a precision other than 16"
    module = compat.family_module(config)
    blocker = getattr(module, "fusion_blocker", None)
    if blocker is None:
        return f"the {module.__name__.rpartition('.')[2] if module else 'user-defined'} family does not fuse"
    return blocker(config.model, config.loss)

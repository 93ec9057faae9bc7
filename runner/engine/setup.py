"""Everything a run builds before it trains or evaluates: seeds, data, the family (model and
loss) on its device, the callbacks, and, in mode=train, the Trainer continued from the run's
last checkpoint (resume=) or started from another run's weights (ckpt_path=, fine-tuning)."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from runner.callbacks.base import Callback, Callbacks
from runner.config import Config, compat
from runner.config.build import build, plain
from runner.engine import checkpoint as ckpt
from runner.engine.clock import TrainingClock
from runner.engine.devices import DeviceContext
from runner.engine.family import DataBundle, Family, StepInParts
from runner.engine.loop import Trainer
from runner.engine.results import RunResults
from runner.errors import UserError
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


def build_callbacks(node: Any) -> Callbacks:
    """The ``callbacks`` config node (``{name: _target_ node}``; null entries are switched off)."""
    built = {}
    for name, spec in (plain(node) if node else {}).items():
        if spec is None:
            continue
        callback = build(spec, f"callbacks.{name}")
        if not isinstance(callback, Callback):
            raise UserError(f"callbacks.{name}: {spec.get('_target_')} is not a runner.callbacks.Callback "
                            "(subclass it and override the hooks you need)")
        built[str(name)] = callback
    return Callbacks(built)


def build_data(config: Config, ctx: DeviceContext, choices: dict[str, str]) -> DataBundle:
    """The dataset's splits; a family/model/loss pair that does not fit them exits 2 first."""
    family_name = compat.family_of_dataset(config.dataset)  # runner's own datasets were checked in rules.check
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


def load_trained(config: Config, family: Family, ctx: DeviceContext) -> None:
    """mode=eval / predict: the checkpoint's weights and the family's own state (thresholds
    tuned on val, the labels it was trained on)."""
    payload = ckpt.load_checkpoint(config.ckpt_path, map_location=ctx.device)
    ckpt.load_model_weights(family.raw_model, payload, config.ckpt_path, for_training=False)
    if payload.get("family") and hasattr(family, "load_state_dict"):
        family.load_state_dict(payload["family"])
    family.model = ctx.wrap(family.model, sync_batchnorm=False)


def make_trainer(config: Config, family: Family, bundle: DataBundle, ctx: DeviceContext, results: RunResults,
                 run_dir: Path | None, callbacks: Callbacks, clock: TrainingClock, in_group: bool) -> Trainer:
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
    trainer = Trainer(family, bundle, ctx, t, config.optim, config.schedule, results, run_dir, callbacks, clock, meta,
                      in_group=in_group)
    restore(config, trainer, results)
    return trainer


def restore(config: Config, trainer: Trainer, results: RunResults) -> None:
    last = ckpt.load_last(Path(config.resume)) if config.resume else None
    if last is not None:
        ckpt.restore_trainer(trainer, last, Path(config.resume) / "checkpoints" / "last.pt")
    elif config.ckpt_path:  # fine-tuning: the weights of another run, a fresh optimizer and loop
        payload = ckpt.load_checkpoint(config.ckpt_path, map_location="cpu")
        skipped = ckpt.load_model_weights(trainer.family.raw_model, payload, config.ckpt_path,
                                          strict=config.ckpt_strict)
        log.warning("initialised the weights from %s%s", config.ckpt_path,
                    f" (left {len(skipped)} tensors as built: {', '.join(skipped[:5])})" if skipped else "")
    if config.resume:
        results.resumed(trainer.state.step)
        results.write_summary(status="running")

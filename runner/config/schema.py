"""Structured configs: the types and defaults of the engine's own groups, checked by Hydra at start-up.

The groups whose options are code (dataset, model, loss) are typed by their ``_target_``'s
signature instead, checked in runner/config/build.py before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

from runner.config.suggest import did_you_mean
from runner.errors import UserError


class Strategy(Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    ddp = "ddp"


class Mode(Enum):
    train = "train"
    eval = "eval"
    predict = "predict"


class MonitorMode(Enum):
    min = "min"
    max = "max"


PRECISIONS = ("32", "tf32", "bf16", "16")
PROGRESS = ("auto", "rich", "plain", "none")
# torch.compile's modes; the last two capture CUDA graphs of their own (not inside trainer.cuda_graph's).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")  # the shipped options of the logger group (runner/conf/logger/)


@dataclass
class EarlyStopping:
    patience: int = 0  # validations without an improvement of trainer.monitor before the run stops; 0 = never
    min_delta: float = 0.0  # an improvement smaller than this does not count


@dataclass
class TrainerConfig:
    """The loop's settings: group ``trainer``, option ``default`` (this class is that option)."""

    max_epochs: Optional[int] = 1  # None: as long as the schedule says (schedule=iwae_paper)
    max_steps: int = -1  # optimizer steps; -1 = no limit
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # None: batch_size
    accumulate_grad_batches: int = 1
    precision: str = "32"  # 32 | tf32 (TF32 matrix products) | bf16 | 16 (autocast)
    gradient_clip_val: float = 0.0  # 0 = no clipping
    seed: int = 0
    deterministic: bool = False
    val_every_n_steps: int = 0  # 0 = at the end of each epoch
    monitor: str = "val/loss"
    monitor_mode: MonitorMode = MonitorMode.min
    log_every_n_steps: int = 50
    ckpt_every_n_steps: int = 0  # 0 = at each epoch end only
    # last.pt at every N-th epoch end (and at the run's end, and on a signal): on short epochs
    # (IWAE's, ~1 s on a GPU) writing every job's checkpoint each epoch costs a few % of the time.
    ckpt_every_n_epochs: int = 1
    num_workers: int = 0
    skip_nonfinite: bool = False
    compile: bool = False  # torch.compile the training step's model (and loss: runner/engine/run.py make_trainer)
    # Its mode: max-autotune-no-cudagraphs generates the matrix products too (Triton, tuned for the
    # shapes at the start: minutes more compile), with the bias and activation fused into them.
    compile_mode: str = "default"
    # torch.compile the optimizer step as well: on a small model fused Adam's one kernel keeps only
    # a few of the GPU's SMs busy (benchmarks/profile_fused.py); generated kernels spread it out.
    # Made for the captured step (cuda_graph), whose lr is a device tensor: without it, a schedule
    # that changes the lr every step makes torch.compile recompile the step for each new value.
    compile_optimizer: bool = False
    cuda_graph: bool = False  # capture the whole optimizer step in one CUDA graph (small models)
    steps_per_graph: int = 1  # with cuda_graph and data_on_device: optimizer steps per graph launch
    data_on_device: bool = False  # keep a tensor-backed training set on the device, batch it there
    channels_last: bool = False
    # Debug runs (the debug group: debug=fdr|overfit|limit|profiler|anomaly). A limit is a whole
    # number of batches (1, 2, ...), a fraction of the split (0.2), or -1 for all of it.
    limit_train_batches: Any = -1
    limit_val_batches: Any = -1
    limit_test_batches: Any = -1
    fast_dev_run: bool = False  # one batch of train, val and test, one epoch
    overfit_batches: int = 0  # > 0: train on the same N batches every epoch (no augmentation), validate on N
    progress: str = "auto"  # auto | rich | plain | none
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    save_top_k: int = 1  # best checkpoints kept by trainer.monitor (best.pt is the best); 0 = none
    keep_last: bool = True  # false: remove checkpoints/last.pt once the run has completed


@dataclass
class DeviceConfig:
    """Where the run goes: group ``device`` (options auto, cpu, gpu, ddp set ``strategy``)."""

    strategy: Strategy = Strategy.auto
    devices: int = 1  # processes for ddp (0 = one per visible GPU)
    index: int = 0  # CUDA device index for strategy=gpu
    backend: str = "nccl"  # nccl | gloo (ddp)
    sync_batchnorm: bool = False


@dataclass
class PathsConfig:
    """Where things are: group ``paths`` (runner/conf/paths/default.yaml), as lightning-hydra-template
    names them. ``data_dir`` holds the shipped datasets' files (their ``root`` / ``path`` is
    ``${paths.data_dir}/<name>``); ``output_dir`` is where run folders go (``output_root`` follows it)."""

    root_dir: str = "."  # the launch folder
    data_dir: str = "data"  # default: $RUNNER_DATA_DIR, else data/ in the launch folder
    output_dir: str = "outputs"  # default: $RUNNER_OUTPUT_DIR, else outputs/ (relative: to the launch folder)


@dataclass
class Config:
    """The whole run. dataset, model, loss, optim and schedule are ``_target_`` nodes, typed by
    their target's signature (runner/build.py) instead of a dataclass."""

    dataset: Any = MISSING
    model: Any = MISSING
    loss: Any = MISSING
    optim: Any = MISSING  # any torch.optim class (runner/optim.py)
    schedule: Any = MISSING  # any torch.optim.lr_scheduler class (runner/schedule.py)
    trainer: TrainerConfig = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    name: str = "run"  # experiment name, part of the run folder's name
    mode: Mode = Mode.train
    ckpt_path: Optional[str] = None  # mode=eval: the checkpoint to evaluate; mode=train: weights to start from
    ckpt_strict: bool = True  # mode=train ckpt_path=...: false loads the tensors whose names and shapes fit
    resume: Optional[str] = None  # a run folder to continue in place
    output_root: str = "outputs"  # ${paths.output_dir} in config.yaml: either key moves the run folders
    paths: PathsConfig = field(default_factory=PathsConfig)
    tags: list[str] = field(default_factory=list)  # every tracker gets them (MLflow, W&B, TensorBoard), and summary.json
    logger: Any = field(default_factory=dict)  # {name: _target_ node}: the selected loggers (runner/loggers/)
    debug: Optional[str] = None  # set by the debug group's options: the run is a debug run (summary.json says so)
    callbacks: Any = field(default_factory=dict)  # {name: _target_ node}: the run's callbacks (runner/callbacks/)


def typed(cfg: DictConfig) -> Config:
    """The composed config as typed objects, interpolations resolved: the Hydra config stops
    here. (Merging into the schema first gives a saved config, read back by resume=, its types.)"""
    for section, schema in (("trainer", TrainerConfig), ("device", DeviceConfig), (None, Config)):
        node = cfg.get(section) if section else cfg
        allowed = {f.name for f in fields(schema)}
        unknown = sorted(set(node.keys()) - allowed) if isinstance(node, DictConfig) else []
        if unknown:  # a `+key` that no code reads: refused like a typo
            where = f"{section}." if section else ""
            raise UserError(f"unknown key '{where}{unknown[0]}'{did_you_mean(unknown[0], allowed)}; allowed keys of "
                            f"{section or 'the config'}: {', '.join(sorted(allowed))}")
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    except MissingMandatoryValue as e:
        raise UserError(f"missing required value: {e.full_key} (set it on the command line: {e.full_key}=...)") from None
    except (InterpolationResolutionError, ValidationError) as e:
        key = getattr(e, "full_key", None)
        raise UserError((f"{key}: " if key else "") + str(e).splitlines()[0]) from None
    return spelled_out(config)


def spelled_out(config: Config) -> Config:
    """The debug shortcuts as the settings they stand for, so that the engine knows only limits:
    trainer.fast_dev_run (one batch of each split, one epoch) and trainer.overfit_batches (N
    batches of train and of val)."""
    t = config.trainer
    if t.fast_dev_run:
        t.limit_train_batches = t.limit_val_batches = t.limit_test_batches = 1
        t.max_epochs, t.max_steps, t.val_every_n_steps = 1, -1, 0
    if t.overfit_batches > 0:
        t.limit_train_batches = t.limit_val_batches = t.overfit_batches
    return config


def same_value(a: Any, b: Any) -> bool:
    """Whether two config values are the same setting, NaN equal to NaN (``nan != nan``, and a
    sweep job with ``optim.lr=nan`` could never be resumed: its saved value would always differ)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b

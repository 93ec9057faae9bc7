"""A run's title: its experiment's name plus what its own overrides changed in what is learned.

``python -m runner -m loss=bce,focal trainer.seed=0,1`` runs four jobs of ``focal_densenet``,
titled ``focal_densenet-loss-bce-seed0``, ``focal_densenet-loss-bce-seed1``, ... (plots, the
closing table, the trackers' run names, and a single run's folder). A config-group override reads
``-group-option``; a key override ``-<last part of the key><value>`` (``optim.lr=0.01`` ->
``lr0.01``). What does not change what is learned stays out: the device, logger, callbacks, debug,
paths and hydra keys, the trainer's bookkeeping and speed settings (``trainer.progress``,
``trainer.num_workers``, ``trainer.compile``, ...; ``trainer.seed``, ``trainer.max_epochs``,
``trainer.batch_size`` ... go in), where the data are (``dataset.root``), ``resume``, ``tags``.
A ``name=`` given on the command line is the title. In a sweep, two jobs that would get the same
title (they differ only in what stays out) each get their job number added.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

# Groups whose choice does not change what is learned (debug's does: debug=fdr trains on one batch).
NOT_IN_TITLE = ("experiment", "device", "logger", "trainer", "callbacks", "paths", "local", "hparams_search")
KEY_GROUPS_NOT_IN_TITLE = ("device", "logger", "callbacks", "debug", "paths", "local")
KEYS_NOT_IN_TITLE = {"name", "mode", "resume", "ckpt_path", "ckpt_strict", "output_root", "tags"}
# The trainer's settings that change how fast or how visibly a run goes, or what it reports, not what it learns.
TRAINER_BOOKKEEPING = {"eval_batch_size", "deterministic", "val_every_n_steps", "monitor", "monitor_mode",
                       "log_every_n_steps", "ckpt_every_n_steps", "ckpt_every_n_epochs", "num_workers", "compile",
                       "compile_mode", "compile_optimizer", "cuda_graph", "steps_per_graph", "data_on_device",
                       "channels_last", "limit_val_batches", "limit_test_batches", "progress", "save_top_k",
                       "keep_last"}
DATA_LOCATIONS = {"root", "path", "csv", "val_csv", "test_csv", "image_dir", "predict", "download"}
MAX_LENGTH = 64  # characters: a folder name that stays readable in a listing
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # anything else (/, spaces, quotes, commas, =) becomes _


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def _key_in_title(key: str) -> bool:
    """Whether a key override (``optim.lr``, ``trainer.seed``) changes what is learned."""
    head, _, rest = key.partition(".")
    if not rest or key in KEYS_NOT_IN_TITLE or head.startswith("hydra") or head in KEY_GROUPS_NOT_IN_TITLE:
        return False
    if head == "trainer":
        return rest.split(".")[0] not in TRAINER_BOOKKEEPING
    return not (head == "dataset" and rest in DATA_LOCATIONS)


def _part(override: str, groups: set[str]) -> str | None:
    """How one override reads in the title, or None where it stays out."""
    if str(override).startswith("~"):
        return None  # a deletion: the option's own default is what runs
    key, value = _key_value(override)
    if key in groups:
        return None if key in NOT_IN_TITLE or key.startswith("hydra") else f"{key.replace('/', '.')}-{value}"
    if not _key_in_title(key):
        return None
    return f"{key.rsplit('.', 1)[-1]}{value}"


def run_title(name: str, overrides: Iterable[str], groups: Iterable[str]) -> str:
    """``name`` plus each override that changes what is learned, file-system safe and at most 64
    characters (a longer one keeps a hash of the rest, so titles stay distinct)."""
    overrides = [str(o) for o in overrides]
    if any(_key_value(o)[0] == "name" for o in overrides):
        return UNSAFE.sub("_", str(name))
    groups = set(groups)
    # key-value, not key=value: a folder name with "=" would break `resume=<folder>` on the command line
    chosen = [part for part in (_part(o, groups) for o in overrides) if part]
    return _cut(UNSAFE.sub("_", "-".join([str(name), *chosen])))


def _cut(title: str, suffix: str = "") -> str:
    if len(title) + len(suffix) > MAX_LENGTH:
        digest = hashlib.sha1(title.encode()).hexdigest()[:8]
        title = f"{title[:MAX_LENGTH - 9 - len(suffix)]}-{digest}"
    return title + suffix


def sweep_jobs(sweep_dir: str | Path) -> list[list[str]] | None:
    """Every job's overrides of a sweep, from its multirun.yaml, as Hydra's basic sweeper expands
    them; None where they cannot be listed (another sweeper's search space, no file)."""
    from omegaconf import OmegaConf

    saved = Path(sweep_dir) / "multirun.yaml"
    if not saved.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = [str(o) for o in OmegaConf.load(saved).hydra.overrides.task]
        parsed = OverridesParser.create().parse_overrides(task)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # an Optuna search space and the like: its trials differ in what they sample
        return None


def unique_title(name: str, overrides: Sequence[str], groups: Iterable[str], sweep_dir: str | Path | None,
                 job: str | None) -> str:
    """The run's title; in a sweep, with ``-<job number>`` added where another job of the sweep
    would get the same title."""
    groups = set(groups)
    title = run_title(name, overrides, groups)
    if not sweep_dir or job is None:
        return title
    jobs = sweep_jobs(sweep_dir)
    if jobs is None or [run_title(name, j, groups) for j in jobs].count(title) < 2:
        return title
    return _cut(title, f"-{job}")


def title_resolver(name: Any, overrides: Any, choices: Any) -> str:
    """``${run_title:${name},${hydra:overrides.task},${hydra:runtime.choices}}`` in the run folder's name."""
    return run_title(str(name), [str(o) for o in overrides or ()], [str(k) for k in (choices or {})])

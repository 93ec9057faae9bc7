"""One job from its composed config, shared by the command line (runner/__main__.py) and the
Python API (``runner.run``): ``resume=`` continues with the run folder's own config (taking the
overrides that may change mid-run), one process at a time holds a run folder, ``device=ddp``
starts one worker per device, and the typed settings go to the engine."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console

from runner.config import Config, same_value, typed
from runner.errors import EXIT_OK, EXIT_USER_ERROR, UserError
from runner.runs.files import folder_in_use, hold_folder
from runner.loggers.base import JobInfo

# Overrides a resumed run takes: its length, its logging and checkpoint cadence, where it runs, its callbacks.
# Everything else (model, data, optimizer, schedule, seed, ...) would make it another run.
CHANGEABLE_ON_RESUME = ("trainer.max_epochs", "trainer.max_steps", "trainer.log_every_n_steps",
                        "trainer.val_every_n_steps", "trainer.ckpt_every_n_steps", "trainer.ckpt_every_n_epochs",
                        "trainer.progress",
                        "trainer.num_workers", "trainer.eval_batch_size", "device", "logger", "callbacks")
LENGTH = ("trainer.max_epochs", "trainer.max_steps")


def key_of(override: str) -> str:
    """The key an override sets: ``+trainer.x=1`` -> ``trainer.x``."""
    return str(override).split("=", 1)[0].lstrip("+~")


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys a command line's overrides set (``hydra.*`` and ``resume`` left out)."""
    keys = [key_of(o) for o in overrides]
    return [k for k in keys if k != "resume" and not k.startswith("hydra.") and k != "hydra"]


def refuse_unchangeable(keys: Sequence[str]) -> None:
    """Exit 2 (UserError) naming the keys a resumed run or sweep cannot take."""
    refused = [k for k in keys if not k.startswith(tuple(f"{c}." for c in CHANGEABLE_ON_RESUME))
               and k not in CHANGEABLE_ON_RESUME]
    if refused:
        raise UserError(f"resume= cannot change {', '.join(refused)} (that would be another run); a resumed run "
                        f"takes only: {', '.join(CHANGEABLE_ON_RESUME)}")


def load_resumed_config(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``resume=<run folder>`` continues with the config that run started with, plus the
    overrides that may change mid-run (taken from ``cfg``, composed with them); others exit 2."""
    folder = Path(cfg.resume)
    saved = folder / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={folder} is not a run folder (no .hydra/config.yaml in it)")
    try:
        resumed = OmegaConf.load(saved)
    except (yaml.YAMLError, ValueError) as e:
        raise UserError(f"resume={folder}: {saved} is not a readable config: {str(e).splitlines()[0]}") from None
    if not isinstance(resumed, DictConfig) or "trainer" not in resumed:
        raise UserError(f"resume={folder}: {saved} is empty or not a runner config")
    # What would change (NaN equal to NaN: a sweep job refused for optim.lr=nan resumes, to be refused again).
    keys = [k for k in override_keys(overrides) if not same_value(_value(cfg, k), _value(resumed, k))]
    refuse_unchangeable(keys)
    for key in keys:
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    if "callbacks" not in resumed:  # saved before callbacks were a group: the built-in ones, as then
        resumed.callbacks = cfg.callbacks
    resumed.resume = str(folder)
    return resumed


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def remove_if_never_started(run_dir: Path) -> bool:
    """A single run rejected before training (exit 2) leaves no folder behind: it holds only its
    config, its log and a failed summary. Sweep jobs keep theirs (summary.csv reports them)."""
    from runner.engine.results import read_summary

    summary = read_summary(run_dir) if (run_dir / "summary.json").is_file() else None
    if summary is not None and (summary.get("steps") or summary.get("status") == "completed"
                                or (run_dir / "checkpoints").exists()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def summary_status(run_dir: Path) -> str | None:
    from runner.engine.results import read_summary

    try:
        return (read_summary(run_dir) or {}).get("status")
    except ValueError:  # a summary.json that is not JSON
        return None


def monitored_value(run_dir: Path, monitor: str) -> float:
    """The job's value for a sweeper that optimises (Optuna): its final monitored metric."""
    from runner.engine.results import read_summary

    summary = read_summary(run_dir) or {}
    value = summary.get("metrics", {}).get(monitor)
    return float(value) if isinstance(value, (int, float)) and summary.get("status") == "completed" else float("nan")


def continued_in_sweep(cfg: DictConfig, run_dir: Path) -> bool:
    """``resume=<sweep folder>`` replays the sweep into its folder: a job that ran there before is
    kept (completed: True, nothing to do) or continued from its checkpoint (``cfg.resume`` set)."""
    if not (run_dir / "summary.json").is_file():
        return False
    if summary_status(run_dir) == "completed":
        return True
    cfg.resume = str(run_dir)
    return False


@dataclass
class Job:
    """A job ready to run: typed settings and what the engine is told about it."""

    config: Config
    run_dir: Path
    choices: dict[str, str]
    info: JobInfo


def prepare_job(cfg: DictConfig, run_dir: Path, choices: dict[str, Any], overrides: Sequence[str] = (),
                sweep_dir: str | None = None) -> Job | None:
    """The job from its composed config, or None where there is nothing to do (a completed run
    resumed with no more epochs or steps). ``choices``: the option chosen in each group (for
    messages); ``overrides``: the command line's (what a resume may change). A bad config found
    before the run starts raises UserError (the caller says it: one line, exit 2)."""
    choices = {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None}
    if cfg.resume and summary_status(Path(cfg.resume)) == "completed" and not set(LENGTH) & set(override_keys(overrides)):
        Console().print(f"{cfg.resume} has completed already: nothing to resume (its folder is left as it is; "
                        "trainer.max_epochs=N or trainer.max_steps=N continues it)", highlight=False, soft_wrap=True)
        return None
    if not cfg.resume:  # a swapped _target_ starts its node clean; eval/predict take the checkpoint's config
        from runner.config.prepare import prepared_config

        cfg = prepared_config(cfg, overrides, choices, run_dir)
    config = typed(load_resumed_config(cfg, overrides) if cfg.resume else cfg)
    if cfg.resume and summary_status(Path(cfg.resume)) == "running" and not folder_in_use(Path(cfg.resume)):
        Console().print(f"{cfg.resume}: its summary says running, but no process holds it (stale: the run "
                        "died before it could record why); continuing from its last checkpoint",
                        highlight=False, soft_wrap=True)
    return Job(config, run_dir, choices, JobInfo.of(overrides, sweep_dir, cfg.resume))


def check_folder(cfg: DictConfig, run_dir: Path) -> None:
    """A run folder is written by one run, ever: a new run refuses a folder that holds another
    run's results, a resumed run writes into its own folder alone, and a completed run whose
    last checkpoint is gone cannot be extended (it would train again from step 0)."""
    if not cfg.resume:
        if (run_dir / "summary.json").is_file() or (run_dir / "checkpoints").is_dir():
            raise UserError(f"{run_dir} holds another run's results: a new run needs a new folder (leave "
                            "hydra.run.dir to runner), or continue that run with resume={run_dir}")
        return
    resumed = Path(cfg.resume)
    if run_dir.resolve() != resumed.resolve():
        raise UserError(f"resume={resumed} continues in its own folder; hydra.run.dir={run_dir} names another")
    if summary_status(resumed) == "completed" and not (resumed / "checkpoints" / "last.pt").is_file():
        raise UserError(f"{resumed} has completed and kept no checkpoints/last.pt (trainer.keep_last=false, or no "
                        "checkpoints callback): it cannot be extended; start a new run (ckpt_path=<its best.pt> "
                        "starts from its weights)")


def run_prepared(job: Job, outcome: dict | None = None) -> int:
    """Run the job in its folder, held against other processes; ``device=ddp`` starts one worker
    per device. Returns the exit code; ``outcome``: see runner/engine/run.py ``run``."""
    from runner.engine.launch import maybe_spawn
    from runner.engine.run import run  # heavy imports after the config is known to be valid

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with hold_folder(job.run_dir if rank0 else None):
        code = maybe_spawn(job.config, job.run_dir, job.choices, job.info)  # ddp: start our own workers if asked
        if code is None:
            code = run(job.config, job.run_dir if rank0 else None, job.choices, job=job.info, outcome=outcome)
    return code


def run_job(cfg: DictConfig, run_dir: Path, choices: dict[str, Any], overrides: Sequence[str] = (),
            sweep_dir: str | None = None, single: bool = False, save_config: bool = False) -> tuple[int, dict | None]:
    """The one entry from a composed config to an exit code, for the command line, ``runner.run``
    and the tests alike (see ``prepare_job`` and ``run_prepared``): (exit code, the run's
    summary.json as it ended). ``single``: a run alone, not a sweep's job: rejected before it
    trained, it leaves no folder behind. ``save_config``: write ``.hydra/`` as Hydra's command
    line does (``runner.run``). A UserError found before the run started propagates, for the
    caller to say."""
    from runner.engine.results import read_summary

    check_folder(cfg, Path(run_dir))  # before anything is written into it
    if save_config and not cfg.resume:
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create([str(o) for o in overrides]), run_dir / ".hydra" / "overrides.yaml")
    outcome: dict = {}
    try:
        job = prepare_job(cfg, run_dir, choices, overrides, sweep_dir)
        code = EXIT_OK if job is None else run_prepared(job, outcome)
    except UserError:
        if single and not cfg.resume:
            remove_if_never_started(run_dir)
        raise
    summary = outcome or (read_summary(run_dir) if (Path(run_dir) / "summary.json").is_file() else None)
    if single and code == EXIT_USER_ERROR and not cfg.resume:
        remove_if_never_started(run_dir)
    return code, summary

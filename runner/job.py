"""One job from its composed config, shared by the command line (runner/__main__.py) and the
Python API (``runner.run``): ``resume=`` continues with the run folder's own config, ``device=ddp``
starts one worker per device, and the typed settings go to the engine."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner.config import typed
from runner.errors import EXIT_OK, EXIT_USER_ERROR, UserError


def load_resumed_config(cfg: DictConfig) -> DictConfig:
    """``resume=<run folder>`` continues with the config that run started with."""
    folder = Path(cfg.resume)
    saved = folder / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={folder} is not a run folder (no .hydra/config.yaml in it)")
    resumed = OmegaConf.load(saved)
    resumed.resume = str(folder)
    return resumed


def completed(run_dir: Path) -> bool:
    from runner.engine.results import read_summary

    try:
        return (read_summary(run_dir) or {}).get("status") == "completed"
    except ValueError:  # a summary.json that is not JSON: not a completed run
        return False


def run_job(cfg: DictConfig, run_dir: Path, choices: dict[str, Any]) -> int:
    """The job's exit code. ``choices``: the option chosen in each config group (for messages)."""
    from rich.console import Console

    from runner.engine.launch import maybe_spawn
    from runner.engine.run import run  # heavy imports after the config is known to be valid

    choices = {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None}
    if cfg.resume and completed(Path(cfg.resume)):
        Console().print(f"{cfg.resume} has completed already: nothing to resume (its folder is left as it is)",
                        highlight=False, soft_wrap=True)
        return EXIT_OK
    try:
        config = typed(load_resumed_config(cfg) if cfg.resume else cfg)
        code = maybe_spawn(config, run_dir, choices)  # ddp: start our own workers if asked
    except UserError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    if code is None:
        rank0 = int(os.environ.get("RANK", "0")) == 0
        code = run(config, run_dir if rank0 else None, choices)
    return code

"""``runner.run([...overrides])``: one job from Python, as ``python -m runner <overrides>`` runs it,
without a shell. It composes the same config (``config_dir`` adds a folder of your own options, as
``--config-dir`` does), writes the same run folder (``.hydra/``, ``run.log``, results), and returns
the job's summary.json with ``run_dir`` and ``exit_code`` added. A config that cannot be composed,
or is found bad before the run starts, raises ``runner.errors.UserError`` with the message the
command line prints; once the run has started, its outcome is in the summary.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from runner.config.compose import compose_job
from runner.config.paths import load_dotenv
from runner.engine.slurm import export_distributed_env
from runner.errors import EXIT_USER_ERROR, UserError


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    """The run's log file, as the command line's logging config writes it."""
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def run(overrides: Sequence[str] = (), config_dir: str | None = None) -> dict[str, Any]:
    from runner.job import run_job

    load_dotenv()  # the launch folder's .env, as on the command line (never over a variable already set)
    export_distributed_env()  # srun's tasks as RANK etc. (runner/engine/slurm.py), as on the command line
    cfg = compose_job(overrides, config_dir)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the config (the run's name) resolves
    run_dir = Path(cfg.hydra.run.dir)  # claims a new run folder (or names the resumed one)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    with logging_to(run_dir / "run.log"):
        code, summary = run_job(cfg, run_dir, choices, list(overrides), single=True, save_config=True)
    kept = run_dir.is_dir()  # a run rejected before training leaves no folder behind
    return {**(summary or {}), "run_dir": str(run_dir.resolve()) if kept else None, "exit_code": code}
